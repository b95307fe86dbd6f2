"""Fixtures shared by the test modules."""

from orthanc import orthanc_server  # noqa: F401 (a real Orthanc with DICOMweb, one per test module that asks)
