"""`python -m qunet bench`'s targets (the issues' goals) and its text report."""

TARGETS = {
    "scoring_fraction_of_matmul": 0.60,
    "quality_slices_per_s_512": 50.0,
    "next_sample_p95_ms": 50.0,  # up to 10,000 volumes, live or in process
    "next_sample_p95_ms_beyond": 100.0,  # beyond (100,000 volumes)
}


def next_sample_limit(volumes: int) -> float:
    return TARGETS["next_sample_p95_ms"] if volumes <= 10000 else TARGETS["next_sample_p95_ms_beyond"]


def targets(result: dict) -> dict:
    out = {}
    s = result.get("scoring")
    if s:
        frac = s["fraction_of_matmul"]  # against the matmul rate measured in the same rounds
        out["scoring >= 60% of matmul GFLOP/s"] = {
            "value": round(frac, 3),
            "met": frac >= TARGETS["scoring_fraction_of_matmul"],
        }
    if result.get("quality"):
        v = result["quality"]["slices_per_s"]
        out["quality >= 50 slices/s at 512x512"] = {"value": v, "met": v >= TARGETS["quality_slices_per_s_512"]}
    n = result.get("next_sample")
    if n:
        worst, limit = max(n["initial"]["p95_ms"], n["disagreement"]["p95_ms"]), next_sample_limit(n["volumes"])
        out[f"Next sample p95 < {limit:.0f} ms ({n['volumes']} volumes)"] = {"value": worst, "met": worst < limit}
    if result.get("ranks"):
        r = result["ranks"]
        out[f"scoring with {r['ranks']} ranks >= 1.7x one rank (one thread each)"] = {
            "value": r["speedup"],
            "met": r["speedup"] >= 1.7,
        }
    for r in result.get("scale", {}).get("runs", []):
        limit, value = next_sample_limit(r["volumes"]), r["next_sample_in_process"]["p95_ms"]
        out[f"Next sample p95 < {limit:.0f} ms in process ({r['volumes']} volumes of synthetic records)"] = {
            "value": value,
            "met": value < limit,
        }
    mem = result.get("memory", {}).get("runs")
    if mem:
        for kind in ("quality", "disagreement"):
            runs = sorted((r for r in mem if r["kind"] == kind), key=lambda r: r["shape"][2])
            if len(runs) >= 2:
                small, big = runs[0], runs[-1]
                # bounded: the deeper volume needs at most a batch-sized margin (here 5% of the volume) more
                grow = big["extra_mb"] - small["extra_mb"]
                out[f"{kind} scoring memory bounded (extra MB at depth {small['shape'][2]} vs {big['shape'][2]})"] = {
                    "value": [small["extra_mb"], big["extra_mb"]],
                    "met": grow <= 0.05 * big["volume_mb"],
                }
    return out


def render(result: dict) -> str:
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']} ({result['machine']['torch_threads']} threads), load "
        f"{result['machine']['load_average_1min']}"
    ]
    if "matmul" in result:
        lines.append(f"matmul fp32 {result['matmul']['n']}^3: {result['matmul']['gflops']} GFLOP/s")
    if "scoring" in result:
        s = result["scoring"]
        lines.append(
            f"scoring ({s['slice_size']}px slices, {s['windows_per_slice']} windows of {s['patch_size']}px, features "
            f"{s['features']}, {s['gflop_per_slice']} GFLOP/slice): {s['slices_per_s']} slices/s = {s['gflops']} "
            f"GFLOP/s ({s['fraction_of_matmul'] * 100:.0f}% of the {s['matmul_gflops_same_rounds']} GFLOP/s matmul "
            f"of the same rounds)"
        )
    if "training" in result:
        t = result["training"]
        lines.append(
            f"training update ({t['batch']} patches of {t['patch_size']}px, features {t['features']}, "
            f"{t['gflop_per_update']} GFLOP): {t['seconds_per_update']} s = {t['gflops']} GFLOP/s "
            f"({t['fraction_of_matmul'] * 100:.0f}% of the {t['matmul_gflops_same_rounds']} GFLOP/s matmul)"
        )
    if "quality" in result:
        q = result["quality"]
        lines.append(f"quality metrics {q['shape']}: {q['slices_per_s']} slices/s")
    if "next_sample" in result:
        n = result["next_sample"]
        for phase in ("initial", "disagreement"):
            lines.append(
                f"Next sample ({n['volumes']} volumes, {phase} phase): p50 {n[phase]['p50_ms']} ms, "
                f"p95 {n[phase]['p95_ms']} ms over {n[phase]['requests']} requests"
            )
        lines.append(
            f"  labels saved: every {n['initial']['requests'] // max(n['initial']['labels_saved'], 1)}th "
            f"answer; auto-update scoring {'on' if n['auto_update_scoring'] else 'off'}; start to the first "
            f"answer {n['unscored_start_to_first_answer_seconds']} s unscored, "
            f"{n['startup_to_first_answer_seconds']} s scored (restart); scoring by the server: quality "
            f"{n['quality_scoring_seconds']} s, disagreement {n['disagreement_scoring_seconds']} s"
        )
    if "memory" in result and "runs" in result["memory"]:
        for r in result["memory"]["runs"]:
            lines.append(
                f"memory {r['kind']} {r['shape']}: volume {r['volume_mb']} MB, peak beyond it {r['extra_mb']} MB"
            )
    if "scale" in result:
        from qunet_bench.scale_bench import render as render_scale

        lines += render_scale(result["scale"])
    if "ranks" in result:
        from qunet_bench.ranks_bench import render as render_ranks

        lines += render_ranks(result["ranks"])
    for name, t in result.get("targets", {}).items():
        lines.append(f"[{'met' if t['met'] else 'NOT met'}] {name}: {t['value']}")
    return "\n".join(lines)
