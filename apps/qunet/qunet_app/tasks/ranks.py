"""What the torchrun commands (score_cohort.py, train_cohort.py) share: joining the ranks, and
running one of them on every local GPU from the server (`run_ranks`)."""

import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from qunet.threads import allowed_cores

from qunet_app.server.processes import die_with_parent


def join_ranks(threads: int = 0) -> tuple[int, int, torch.device]:
    """(rank, ranks, device): the torch.distributed group torchrun describes (gloo on CPU, NCCL with one GPU per
    local rank), or one rank without torchrun; torch CPU threads: `threads`, else the allowed cores (qunet.threads)
    over the local ranks: the most that qunet.threads.share_cores gives this rank."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    torch.set_num_threads(threads or max(1, len(allowed_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return (dist.get_rank(), dist.get_world_size(), device) if dist.is_initialized() else (0, 1, device)


def leave_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(command: list[str], ranks: int) -> dict:
    """Run an app command (the script and its arguments) on `ranks` local ranks with torchrun; the JSON its rank 0
    prints last. The ranks die with the calling process; RuntimeError with the end of their output if they fail."""
    with tempfile.TemporaryDirectory(prefix="qunet-ranks-") as tmp:  # torchrun leaves its rendezvous folders in TMPDIR
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *command],
            capture_output=True,
            text=True,
            preexec_fn=die_with_parent,
            env={**os.environ, "TMPDIR": tmp},
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(command[0])} over {ranks} ranks failed: {(done.stdout + done.stderr)[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])
