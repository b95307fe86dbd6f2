"""A real `monailabel start_server` over a copy of the app, on 127.0.0.1 and a free port (loopback only), as a
user starts it: the benchmarks' live server (`bench`, `rescore`) and the tests' (tests/live_server.py)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: the benchmarks start its app as a user does
APP = REPO / "apps" / "qunet"


def copy_app(dest: Path) -> Path:
    """A copy of the repository's app without its state (model, logs), so that what a run writes stays with it."""
    shutil.copytree(APP, dest, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`workdir/app` (copied from the repository's app unless there from an earlier server: a restart keeps its
    model folder), its log `workdir/server-<port>.log`, its temporary files in `workdir/tmp`. `studies`: a folder
    or a DICOMweb URL; `env` is added to this process's environment, less its MONAI_LABEL_* settings."""

    def __init__(
        self, studies: Path | str, workdir: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.studies, self.conf, self.env = studies, conf or {}, env or {}
        self.app_dir = workdir / "app"
        if not self.app_dir.exists():
            copy_app(self.app_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "Server":
        import requests

        cmd = [
            sys.executable,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(self.app_dir),
            "--studies",
            str(self.studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        tmp = self.app_dir.parent / "tmp"  # what the server leaves in its temporary folder stays with the run
        tmp.mkdir(exist_ok=True)
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")
        }  # in-process tests set them
        env = {
            **inherited,
            "TMPDIR": str(tmp),
            "MONAI_LABEL_TRACKING_ENABLED": "false",
            "MONAI_LABEL_SESSION_PATH": str(self.app_dir / "sessions"),
            **self.env,
        }
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.app_dir.parent,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"monailabel server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):
                if requests.get(f"{self.url}/info/", timeout=2).ok:
                    return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"monailabel server did not answer in {timeout} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (the server, its scoring and training subprocesses); SIGKILL after 30 s."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def last_task(self, kind: str) -> dict:
        """The newest `kind` ("scoring" or "train") run MONAI Label knows of (GET /<kind>/): id, request, status;
        {} before any."""
        import requests

        r = requests.get(f"{self.url}/{kind}/", timeout=60)
        return r.json() if r.ok and r.content else {}

    def wait_for_task(
        self, kind: str, after: str | None = None, method: str | None = None, timeout: float = 7200
    ) -> dict:
        """Until the newest `kind` run (another than the run `after`; of scoring `method` if given) has ended; that
        run. RuntimeError if it did not end DONE."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            task = self.last_task(kind)
            if (
                (after is None or task.get("id") != after)
                and task.get("status") not in (None, "SUBMITTED", "RUNNING")
                and (method is None or task.get("request", {}).get("method") == method)
            ):
                if task["status"] != "DONE":
                    raise RuntimeError(f"{kind} run ended {task['status']}: {task.get('details', [])[-3:]}")
                return task
            time.sleep(0.5)
        raise TimeoutError(f"no {kind} run ended in {timeout} s")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
