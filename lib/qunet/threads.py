"""How many threads torch uses on the CPU: the cores this process may use, less those other processes keep busy.

torch's OpenMP threads meet at the end of every parallel region, and the U-net++'s layers are many small regions:
when another process takes one of the cores, the thread on that core gets a time slice now and then, and the
others wait for it at every region (spinning on their own cores): fewer threads than cores then run faster
(measured in docs/contention.md). So every process that computes (the server's infer, scoring and training
subprocesses, torchrun ranks) measures,
every few seconds, how much CPU time the other processes took on its cores, and runs as many threads as there are
cores left (at least one), up to its cap (a torchrun rank's cap is its share of the cores, so ranks do not shrink
each other); two of the app's processes that compute at once each see the other and share the cores.

`QUNET_CORES` (set by the app from `--conf cores`; 0 or unset: all) caps the cores every process of the app uses.
"""

import os
import time

import torch

CORES_ENV = "QUNET_CORES"
INTERVAL = 2.0  # seconds between two looks at the machine's load
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def allowed_cores() -> list[int]:
    """The CPUs this process may run on (its affinity), as many as QUNET_CORES allows."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cap = int(os.environ.get(CORES_ENV) or 0)
    return cpus[:cap] if cap > 0 else cpus


def _busy_seconds(cpus: list[int]) -> float | None:
    """CPU time spent on `cpus` by every process since boot (Linux /proc/stat), or None where it cannot be read."""
    wanted = {f"cpu{n}" for n in cpus}
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
    busy = [sum(int(v) for v in row[1:9]) - int(row[4]) - int(row[5]) for row in rows if row[0] in wanted]
    return sum(busy) / CLOCK_TICKS if busy else None


class CoreShare:
    """Call it often (every training update, every chunk of slices): at most every `interval` seconds it sets torch's
    thread count to the allowed CPUs that other processes left free since the last look, at most `cores`."""

    def __init__(self, cores: int, interval: float = INTERVAL) -> None:
        self.cpus = allowed_cores()
        self.cores = max(1, min(cores, len(self.cpus)))
        self.interval = interval
        self._last: tuple[float, float, float | None] | None = None

    def __call__(self) -> int:
        now = time.monotonic()
        if self._last is None or now - self._last[0] >= self.interval:
            sample = (now, time.process_time(), _busy_seconds(self.cpus))
            if self._last is None:
                torch.set_num_threads(self.cores)
            elif sample[2] is not None and self._last[2] is not None:
                others = (sample[2] - self._last[2] - (sample[1] - self._last[1])) / (now - self._last[0])
                # the allowed cores others leave free, up to this process's cap (torchrun ranks: their share each)
                threads = max(1, min(self.cores, round(len(self.cpus) - others)))
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
            self._last = sample
        return torch.get_num_threads()


_shared: CoreShare | None = None


def share_cores() -> int:
    """The thread count to compute with now, from the process's CoreShare. Made at the first call, with the thread
    count set until then as its most (torch's default: every core; OMP_NUM_THREADS, a --threads option, a torchrun
    rank's share of the cores), within the allowed cores."""
    global _shared
    if _shared is None:
        _shared = CoreShare(min(torch.get_num_threads(), len(allowed_cores())))
    return _shared()
