"""The hardening of MONAI Label's server, installed in one call (`gate.install`): request checks, uploads, errors,
background processes, the temporary folder, and the status page."""
