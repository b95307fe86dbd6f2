"""Train the app's model on the annotated slices of a studies folder or DICOMweb source, over torchrun ranks.

    torchrun --nproc_per_node 8 apps/qunet/train_cohort.py --studies FOLDER_OR_URL [--conf KEY VALUE ...]
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_endpoint HOST:PORT apps/qunet/train_cohort.py --studies URL

The app's own trainer (the task behind POST /train/qunet; `--request` takes the same keys) with
DistributedDataParallel: each rank trains its share of every batch (qunet.training), and rank 0 publishes the
model into the app's model folder with its train stats and history, as a training through the server does (a
running server picks the model up the same way). Same result as one process up to floating-point rounding; the
batch size must split evenly over the ranks. Without torchrun it is one rank. POST /train/qunet with
`"multi_gpu": true` runs this on every local GPU. Give the same `--conf` values as the server. Rank 0 holds the
app's training lock (a running server's training, or another run, makes it fail with "a training is running").
"""

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

from qunet.config import ReadConfig  # noqa: E402
from qunet.io import set_read_config  # noqa: E402

from qunet_app.datastore.dicomweb import open_studies  # noqa: E402
from qunet_app.server.processes import die_with_parent, training_lock  # noqa: E402
from qunet_app.settings import AppConf, model_dir, published_model  # noqa: E402
from qunet_app.tasks.ranks import join_ranks, leave_ranks  # noqa: E402
from qunet_app.tasks.train import QUNetTrain  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", required=True)
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--request", default="{}", help="training settings as POST /train/qunet takes them (JSON)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (default: cores / local ranks)")
    p.add_argument("--locked", action="store_true", help="the caller holds the app's training lock (the server does)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    if "WORLD_SIZE" in os.environ:
        die_with_parent()  # torchrun's agent killed: its ranks go too
    rank, ranks, device = join_ranks(args.threads)
    conf = AppConf.from_conf(dict(args.conf))
    set_read_config(ReadConfig(max_voxels=conf.max_voxels))
    trainer = QUNetTrain(model_dir(APP_DIR), conf, published_model(APP_DIR))
    request = {**json.loads(args.request), "device": str(device), "multi_gpu": False}
    # never beside another training (a server's, or another run of this script): both would publish the model
    with contextlib.nullcontext() if args.locked or rank != 0 else training_lock(model_dir(APP_DIR)):
        entry = trainer(request, open_studies(args.studies, conf))
    if rank == 0:
        print(json.dumps({"ranks": ranks, **entry}))
    leave_ranks()
    return entry


if __name__ == "__main__":
    main()
