"""What the experiment commands share on the command line: the machine they run on, network widths, and the command
line they record next to their figures."""

import argparse
import shlex
import sys

import torch

from qunet.network import default_device


def widths(value: str) -> tuple[int, ...]:
    """`--features 8,16,32,64,128,8`: the U-net++'s widths, comma-separated."""
    return tuple(int(x) for x in value.split(","))


def positive(value: str) -> int:
    """A count on the command line (seeds, rounds, slices, epochs, pixels): 1 or more."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def share(value: str) -> float:
    """A share on the command line (of training patches, ...): from 0 to 1."""
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {value}")
    return number


def add_machine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def machine(args: argparse.Namespace) -> torch.device:
    """Applies --threads and returns the device --device names (default: CUDA when available, else the CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device) if args.device else default_device()


def recorded_command(name: str) -> str:
    """The command line of `python -m qunet NAME ...` as a shell would take it back (globs quoted), or "" when the
    sub-command was called from Python (tests) rather than from the command line."""
    return "python -m qunet " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == [name] else ""
