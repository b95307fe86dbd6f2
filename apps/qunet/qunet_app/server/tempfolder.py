"""The server's own temporary folder: nothing the app or MONAI Label writes for a request stays in the system's.

MONAI Label writes into the system's temporary folder (`tempfile`) and does not always remove what it wrote: its
launcher's logging configuration (a `tmp*.json` per start), OHIF labels converted to NIfTI, DICOM SEG answers;
torch's compiler makes a `torchinductor_<user>` folder there. Here the server (and every scoring, training and
torchrun subprocess, which inherit TMPDIR) uses `<model folder>/tmp/<server pid>`, and torch's compiler
`<model folder>/tmp/torchinductor`:

- at start-up, the folders of servers no longer running are removed (a killed server's leftovers), as is the
  logging configuration this server's launcher left in the system's temporary folder;
- while it runs, a file left there longer than STALE_SECONDS (no request takes that long) is removed.

Not at exit: uvicorn ends a server stopped by SIGTERM with the signal itself, which runs no exit handler; the next
start removes the folder (empty after a clean stop: MONAI Label removes each answer's files after sending them).
"""

import glob
import logging
import os
import shutil
import tempfile
import threading
import time

from qunet_app.server.processes import alive

logger = logging.getLogger(__name__)

TEMP = "tmp"  # in the app's model folder
COMPILER_CACHE = "torchinductor"  # in TEMP: torch's compiler cache, kept between starts as a cache is
STALE_SECONDS = 3600.0
SWEEP_SECONDS = 300.0


def use_own_temp_folder(model_dir: str, app_dir: str) -> str:
    """Make this server's temporary folder the process's and its subprocesses'; returns it."""
    root = os.path.join(model_dir, TEMP)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name == COMPILER_CACHE:
            continue
        if not name.isdigit() or int(name) == os.getpid() or not alive(int(name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _remove_launcher_log_config(tempfile.gettempdir(), app_dir)
    folder = os.path.join(root, str(os.getpid()))
    os.makedirs(folder, exist_ok=True)
    os.environ["TMPDIR"] = folder
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, COMPILER_CACHE)
    tempfile.tempdir = folder
    threading.Thread(target=_sweep_forever, args=(folder,), name="qunet-temp-sweep", daemon=True).start()
    return folder


def _remove_launcher_log_config(system_temp: str, app_dir: str) -> None:
    """`monailabel start_server` writes its logging configuration to `<temp>/tmpXXXX.json` (pointing at this app's
    logs folder) and never removes it; uvicorn has read it by the time the app is built."""
    logs = os.path.join(app_dir, "logs")
    started = time.time() - time.monotonic() + _process_start_monotonic()
    for path in glob.glob(os.path.join(system_temp, "tmp*.json")):
        try:
            if os.path.getmtime(path) < started - 1:
                continue
            with open(path) as f:
                if logs not in f.read(1 << 16):
                    continue
            os.remove(path)
        except OSError:
            continue


def _process_start_monotonic() -> float:
    """This process's start, in CLOCK_MONOTONIC seconds (Linux: /proc/self/stat); now elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def sweep(folder: str, now: float | None = None) -> None:
    """Remove what was left in `folder` longer than STALE_SECONDS."""
    now = time.time() if now is None else now
    for entry in os.scandir(folder):
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_SECONDS:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.remove(entry.path)
        except OSError:
            continue


def _sweep_forever(folder: str) -> None:
    while True:
        time.sleep(SWEEP_SECONDS)
        if os.path.isdir(folder):
            sweep(folder)
