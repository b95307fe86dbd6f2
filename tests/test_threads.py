"""The app's processes share the cores with other work (issue 40, qunet.threads): torch's thread count follows the
cores other processes leave free, within the cap that QUNET_CORES (--conf cores) and the process set."""

import subprocess
import sys
import time

import pytest
import torch

from live_server import wait_for
from qunet.threads import CORES_ENV, CoreShare, allowed_cores


@pytest.fixture
def torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_busy_process_gets_a_core_and_gives_it_back(torch_threads):
    cores = len(allowed_cores())
    share = CoreShare(cores, interval=0.5)
    assert share() == cores == torch.get_num_threads()  # the first call: every core, before any look
    time.sleep(1.2)
    start = share()  # what the machine's other work leaves now (a test machine may be busy)
    if start < 2:
        pytest.skip(f"{cores} core(s), {start} left by the machine's other work: no core to give")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: share() == start - 1, 20, "one thread fewer beside a process spinning on a core", poll=0.2)
        assert torch.get_num_threads() == start - 1
    finally:
        busy.kill()
        busy.wait()
    wait_for(lambda: share() == start, 20, "the core back once the busy process ended", poll=0.2)


def test_the_cores_setting_caps_every_process(torch_threads, monkeypatch):
    monkeypatch.setenv(CORES_ENV, "1")
    assert len(allowed_cores()) == 1
    assert CoreShare(64)() == 1 == torch.get_num_threads()
