"""Records and policy at hospital scale (`python -m qunet bench --only scale`): synthetic records of N volumes in
the app's SQLite record store, and what one Next sample costs over them in this process, as the app's strategy
does it: the kept ranking (qunet.policy.Ranking) updated with the volumes whose records changed since the last
answer (the previous answer's served slices), its pick, and the write of the answer's record. Also what a fresh
process pays once to read every record and build the ranking (the server's start-up). No server, no images: the
live-server figures are `next_sample` (`python -m qunet bench --only next_sample --volumes N`)."""

import tempfile
import time
from pathlib import Path

import numpy as np

from qunet.config import SelectionConfig
from qunet.policy import LoopState, Ranking, VolumeState
from qunet.recordstore import RecordStore

QUALITY, DISAGREEMENT, SERVED = "qunet_quality", "qunet_disagreement", "qunet_served"  # the app's record keys


def synthetic_records(count: int, depth: int, seed: int = 0) -> dict[str, dict]:
    """Records shaped like the app's: per-slice quality metrics and S0, per-slice Q with the slices below q0."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        q = np.round(rng.beta(5, 1, depth), 5)
        out[f"vol{i:06d}"] = {
            QUALITY: {
                "signature": f"s{i}",
                "initial": rng.choice(depth, 5, replace=False).tolist(),
                **{m: np.round(rng.random(depth), 5).tolist() for m in ("blurriness", "psnr_inv", "cov", "mean")},
            },
            DISAGREEMENT: {
                "model": "m",
                "q0": 0.5,
                "q": q.tolist(),
                "flagged": np.argsort(q)[: int((q < 0.5).sum())].tolist(),
                "area": np.round(rng.exponential(20, depth) * (rng.random(depth) < 0.2)).tolist(),
            },
        }
    return out


def volume_state(image_id: str, r: dict) -> VolumeState:
    rec = r[DISAGREEMENT]
    return VolumeState(
        image_id, r[QUALITY]["initial"], rec["q"], ranked=rec["flagged"], area=rec["area"], depth=len(rec["q"])
    )


def _percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def scale_bench(counts=(1000, 10000, 100000), depth: int = 64, requests: int = 30, workdir: str | None = None) -> dict:
    runs = []
    for count in counts:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = str(Path(tmp) / "qunet_records.sqlite")
            writer, reader = RecordStore(path), RecordStore(path)
            t = time.perf_counter()
            writer.add_missing(synthetic_records(count, depth))
            fill = time.perf_counter() - t
            t = time.perf_counter()
            version = reader.version()
            ranking = Ranking(
                SelectionConfig(), (volume_state(i, r) for i, r in reader.all().items())
            )  # a fresh process
            startup = time.perf_counter() - t
            loop = LoopState(has_model=True)
            refresh, pick, write = [], [], []
            for i in range(requests):
                t = time.perf_counter()
                version, changed = reader.changed_since(version)  # the previous answer's record was written
                for image_id in changed:
                    ranking.put(volume_state(image_id, reader.get(image_id)))
                t1 = time.perf_counter()
                chosen = ranking.choose(loop)
                t2 = time.perf_counter()
                writer.update(chosen.image_id, {SERVED: {f"client-{i}": {"slices": chosen.slices, "ts": time.time()}}})
                t3 = time.perf_counter()
                refresh.append(t1 - t)
                pick.append(t2 - t1)
                write.append(t3 - t2)
            total = [a + b + c for a, b, c in zip(refresh, pick, write)]
            runs.append(
                {
                    "volumes": count,
                    "slices_per_volume": depth,
                    "records_mb": round(sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20, 3),
                    "fill_seconds": round(fill, 1),
                    "read_and_rank_seconds": round(startup, 2),
                    "refresh": _percentiles(refresh),
                    "policy": _percentiles(pick),
                    "write": _percentiles(write),
                    "next_sample_in_process": _percentiles(total),
                    "requests": requests,
                }
            )
            writer.close()
            reader.close()
    return {"runs": runs}


def render(result: dict) -> list[str]:
    return [
        f"records + policy, {r['volumes']} volumes x {r['slices_per_volume']} slices ({r['records_mb']} MB): Next "
        f"sample in process p50 {r['next_sample_in_process']['p50_ms']} ms, p95 "
        f"{r['next_sample_in_process']['p95_ms']} "
        f"ms (ranking update p95 {r['refresh']['p95_ms']} ms, pick p95 {r['policy']['p95_ms']} ms, record write p95 "
        f"{r['write']['p95_ms']} ms); a fresh process reads every record and ranks them in "
        f"{r['read_and_rank_seconds']} s"
        for r in result["runs"]
    ]
