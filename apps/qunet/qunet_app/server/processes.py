"""Background work dies with the server, never runs twice, and a restart clears what a killed training left.

MONAI Label runs training and scoring as `python -m monailabel.interfaces.utils.app ...` subprocesses of the
server (monailabel/utils/async_tasks/utils.py). Killing only the server left them running: a training kept
replacing the model while the restarted server started a second one beside it. Here:

- `die_with_server()`, called when the app is constructed: in the server it records the server's pid in the
  environment its subprocesses inherit; in such a subprocess it asks Linux to SIGKILL the process when its parent
  dies (prctl PR_SET_PDEATHSIG; the signal follows the parent thread that started it: MONAI Label's task worker,
  which lives as long as the server), then exits at once if the server is already gone (it died before the
  request took effect: the process was handed to another parent).
- `training_lock(model_dir)`: an exclusive file lock held for the whole training, by whichever process trains;
  the kernel releases it when that process dies, so no stale lock survives a kill.
- `clean_after_training(model_dir)`: at start-up, when no training holds the lock, removes the partial files a
  killed training can leave: the app's temporary copies (`.tmp-*`), ignite's atomic checkpoint temporaries
  (`tmpXXXXXXXX`) and MONAI Label's dataset caches (`cache_<run id>`).
"""

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator

from filelock import FileLock, Timeout

from qunet_app.server.errors import Conflict

logger = logging.getLogger(__name__)

SERVER_PID = "QUNET_SERVER_PID"
TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs training and scoring with
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_NAME = "qunet-train.lock"
PARTIAL = re.compile(
    r"\.tmp-.*|tmp[a-z0-9_]{8}"
)  # qunet_app.datastore.local's temporary copies; ignite DiskSaver's temporaries
CACHE = re.compile(r"cache_\d{8}_\d{6}")  # MONAI Label's per-run dataset cache (removed when a run ends normally)


def alive(pid: object) -> bool:
    """Whether a process with this pid runs (another user's counts as running)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def launched_as_server() -> bool:
    """Whether this process is `monailabel start_server` (its launcher or `python -m monailabel.main`), not a program
    that builds the app inside itself: only a server may take over its process's temporary folder."""
    return "start_server" in sys.argv[1:2]


def in_task_subprocess() -> bool:
    return getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) == TASK_MODULE


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing): the ranks a training launched with
    torchrun (qunet_app.tasks.train.launch) must not outlive the task that started them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def die_with_server() -> None:
    if not in_task_subprocess():
        os.environ[SERVER_PID] = str(os.getpid())  # inherited by the subprocesses started from now on
        return
    server = os.environ.get(SERVER_PID, "")
    if not server.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this task may outlive the server")
    if os.getppid() != int(server):
        logger.error(f"the server (pid {server}) is gone: not starting this task")
        os._exit(1)


@contextlib.contextmanager
def training_lock(model_dir: str) -> Iterator[None]:
    """Held while training; Conflict (HTTP 409) if another process trains now."""
    os.makedirs(model_dir, exist_ok=True)
    lock = FileLock(os.path.join(model_dir, LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise Conflict("a training is running already (started by this server or one before it)") from None
    try:
        yield
    finally:
        lock.release()


def clean_after_training(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        return
    try:
        with training_lock(model_dir):
            for folder, dirs, files in os.walk(model_dir):
                for name in [d for d in dirs if CACHE.fullmatch(d)]:
                    logger.warning(f"removing {os.path.join(folder, name)}, left by a killed training")
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                    dirs.remove(name)
                for name in files:
                    if PARTIAL.fullmatch(name):
                        logger.warning(f"removing {os.path.join(folder, name)}, left by a killed training")
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(folder, name))
    except Conflict:
        logger.warning("a training is running: its files are left alone")
