"""Score a whole studies folder or DICOMweb source with the app's own scoring methods, sharded over torchrun ranks.

    torchrun --nproc_per_node 2 apps/qunet/score_cohort.py --studies FOLDER_OR_URL [--conf KEY VALUE ...]
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_endpoint HOST:PORT apps/qunet/score_cohort.py --studies URL

Each rank runs `qunet_quality` then `qunet_disagreement` (the published model, else `pretrained_path`) on every
WORLD_SIZE-th image of the run's order, writing into the same records as the server (`qunet_records.sqlite`:
transactions, safe across processes): a server started afterwards, or running meanwhile, skips what is current.
torch.distributed (gloo on CPU, NCCL on GPUs, one GPU per local rank) joins the ranks: the totals are summed, and
rank 0 records the model's agreement (the stop signal) once every shard is done. Without torchrun it is one rank.
Give the same `--conf` values as the server (q0, patch_size, features, labels, quality settings). `--methods`
runs one of the two; `--progress` has rank 0 report its share's progress where the server's Next sample reads it
(the server itself runs `--methods disagreement --progress` on every GPU when a machine has two or more).
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

from qunet.config import ReadConfig  # noqa: E402
from qunet.io import file_signature, set_read_config  # noqa: E402

from qunet_app.datastore.dicomweb import open_studies  # noqa: E402
from qunet_app.settings import AppConf, model_dir, published_model  # noqa: E402
from qunet_app.tasks.ranks import join_ranks, leave_ranks  # noqa: E402
from qunet_app.tasks.scoring import DisagreementScoring, QualityScoring  # noqa: E402

COUNTS = ("scored", "skipped", "failed")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", required=True)
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--model", help="model file (default: the app's published model, else conf pretrained_path)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (default: cores / local ranks)")
    p.add_argument("--methods", nargs="+", choices=("quality", "disagreement"), default=["quality", "disagreement"])
    p.add_argument(
        "--progress", action="store_true", help="rank 0 writes its share's progress to the app's model folder"
    )
    args = p.parse_args(argv)
    if args.model and not os.path.isfile(args.model):  # never another model in its place
        p.error(f"--model {args.model}: no such file")
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")

    rank, ranks, device = join_ranks(args.threads)

    conf = AppConf.from_conf(dict(args.conf))
    set_read_config(ReadConfig(max_voxels=conf.max_voxels))
    datastore = open_studies(args.studies, conf)
    path = conf.model_in_use(published_model(APP_DIR), args.model)
    state_dir = model_dir(APP_DIR) if args.progress and rank == 0 else None
    methods = {"quality": QualityScoring(conf, state_dir, shard=(rank, ranks))}
    if path:
        methods["disagreement"] = DisagreementScoring(conf, lambda: path, state_dir, shard=(rank, ranks))
    methods = {name: method for name, method in methods.items() if name in args.methods}
    totals = {}
    for name, method in methods.items():
        start = time.perf_counter()
        counts = method({}, datastore)
        if ranks > 1:
            summed = torch.tensor([counts[k] for k in COUNTS], dtype=torch.long, device=device)
            dist.all_reduce(summed)  # also a barrier: every shard is written when it returns
            counts.update(zip(COUNTS, summed.tolist()))
        totals[name] = {**counts, "seconds": round(time.perf_counter() - start, 2)}  # until the slowest rank is done
    if rank == 0 and "disagreement" in methods and not (ranks == 1 and state_dir):  # else the scoring recorded it
        os.makedirs(model_dir(APP_DIR), exist_ok=True)
        DisagreementScoring(conf, lambda: path, model_dir(APP_DIR)).record_agreement(datastore, file_signature(path))
    if rank == 0:
        print(json.dumps({"ranks": ranks, "model": path, **totals}))
    leave_ranks()
    return totals


if __name__ == "__main__":
    main()
