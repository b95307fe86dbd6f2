"""What MONAI Label runs for the app: infer, train, the scoring methods and the Next sample strategy."""
