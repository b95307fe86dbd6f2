"""Where images, labels and the app's records live: a local folder or a DICOMweb server, crash-safe."""
