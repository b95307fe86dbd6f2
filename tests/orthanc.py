"""A throw-away Orthanc DICOMweb server on 127.0.0.1, for tests and for trying the app by hand.

tests/conftest.py imports the fixture, which yields the DICOMweb root URL (http://127.0.0.1:PORT/dicom-web):

    from orthanc import orthanc_server  # module scope; make_orthanc_fixture("session") for one per session

By hand (Orthanc comes from `.ci/services.sh`), run it in the foreground until Ctrl-C:

    python tests/orthanc.py [--port 8042] [--storage DIR]

then point MONAI Label at it with `--studies http://127.0.0.1:8042/dicom-web`. Without --storage the
images live in a temporary folder removed on exit. Orthanc only accepts connections from this machine.
`segs_of` and `seg_slices` read back the DICOM SEGs a test stored there.
"""

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from qunet_bench.server import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "run .ci/services.sh (installs the Debian packages orthanc and orthanc-dicomweb)"


class OrthancMissing(RuntimeError):
    pass


def find_orthanc() -> str:
    # Debian installs the binary in /usr/sbin, which is not on every user's PATH.
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if not binary:
        raise OrthancMissing(f"the Orthanc binary is not installed: {INSTALL_HINT}")
    if not DICOMWEB_PLUGIN.exists():
        raise OrthancMissing(f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is not installed: {INSTALL_HINT}")
    return binary


@contextlib.contextmanager
def run_orthanc(port: int | None = None, storage: str | Path | None = None, timeout: float = 30) -> Iterator[str]:
    """Start Orthanc, wait until its DICOMweb root answers, yield that URL, stop it on exit."""
    binary = find_orthanc()
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="orthanc-") as tmp:
        storage = Path(storage or Path(tmp) / "storage")
        config = {
            "Name": "qunet-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": port,
            "DicomPort": free_port(),  # its DICOM (DIMSE) listener is unused but always on
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config_path = Path(tmp) / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = Path(tmp) / "orthanc.log"
        url = f"http://127.0.0.1:{port}/dicom-web"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, f"{url}/studies", timeout, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen, probe: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(probe, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"Orthanc did not answer {probe} within {timeout} s:\n{log_path.read_text()[-3000:]}")


def segs_of(url: str, image_id: str) -> list[pydicom.Dataset]:
    """The SEG instances on the server that reference the image series."""
    client = DICOMwebClient(url)
    found = []
    for ds in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, series = ds["0020000D"]["Value"][0], ds["0020000E"]["Value"][0]
        for meta in client.retrieve_series_metadata(study, series):
            seg = pydicom.Dataset.from_json(meta)
            if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image_id:
                found.append(seg)
    return found


def seg_slices(url: str, image_id: str, seg: pydicom.Dataset) -> set[int]:
    """Slices k (InstanceNumber - 1) of the image series that the SEG's frames reference."""
    client = DICOMwebClient(url)
    study = seg.StudyInstanceUID
    number = {
        ds["00080018"]["Value"][0]: ds["00200013"]["Value"][0] - 1
        for ds in client.search_for_instances(study, image_id, fields=["InstanceNumber"])
    }
    return {
        number[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        for frame in seg.PerFrameFunctionalGroupsSequence
    }


def make_orthanc_fixture(scope: str = "module"):
    """A pytest fixture yielding the DICOMweb root URL of a fresh Orthanc; fails (not skips) without Orthanc."""

    @pytest.fixture(scope=scope)
    def orthanc_server() -> Iterator[str]:
        missing = ""
        try:
            find_orthanc()
        except OrthancMissing as e:
            missing = str(e)
        if missing:  # failed outside the except clause, so the report is the message alone
            pytest.fail(missing, pytrace=False)
        with run_orthanc() as url:
            yield url

    return orthanc_server


orthanc_server = make_orthanc_fixture("module")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8042, help="HTTP port (default 8042)")
    parser.add_argument("--storage", help="folder that keeps the images between runs (default: a temporary one)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: exit(0))  # `kill` stops Orthanc too, through the finally clause
    try:
        with run_orthanc(args.port, args.storage) as url:
            print(f"Orthanc DICOMweb at {url} (Ctrl-C stops it)", flush=True)
            while True:
                time.sleep(3600)
    except OrthancMissing as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
