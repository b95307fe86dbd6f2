"""The QU-net++ project's experiments, benchmarks and data generators (`python -m qunet COMMAND`): outside the
core library `qunet`, which never imports them."""
