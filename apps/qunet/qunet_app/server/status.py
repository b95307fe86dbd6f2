"""The loop's status: the `qunet` field of GET /info/ and the annotation lead's page at /qunet/ (status.html).

The page is one self-contained HTML document (inline CSS and SVG, no script, nothing fetched) whose every string
from files or clients (image ids, model signatures, messages) is HTML-escaped; its Content-Security-Policy forbids
scripts besides.
"""

import html
import logging
import os
import string
import sys
import threading
import time
from typing import Any

from fastapi import Depends
from fastapi.responses import HTMLResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.utils.app import app_instance

from qunet.policy import VolumeState

from qunet_app.datastore import keys
from qunet_app.tasks.progress import read_history, read_progress
from qunet_app.tasks.strategy import QUNetStrategy, Snapshot

logger = logging.getLogger(__name__)

TEMPLATE = string.Template(open(os.path.join(os.path.dirname(__file__), "status.html")).read())
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
REFRESH_SECONDS = 15


def _open_q(v: VolumeState) -> list[float]:
    return [q for k, q in enumerate(v.q or ()) if q is not None and k not in v.annotated]


class LoopStatus:
    def __init__(self, strategy: QUNetStrategy, max_age: float = 2.0) -> None:
        self.strategy = strategy
        self.max_age = max_age  # GET /info/ is asked for on every Next sample and task start: reuse a recent summary
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def summary(self, datastore: Datastore) -> dict[str, Any]:
        """The loop's state, at most `max_age` seconds old; the scoring progress read now (two small files)."""
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.max_age:
                try:
                    self._cached = (time.monotonic(), self._records_summary(self.strategy.snapshot(datastore)))
                except Exception as e:  # GET /info/ must keep answering
                    logger.exception("cannot summarise the loop")
                    return {"error": f"{type(e).__name__}: {e}"}
            return {**self._cached[1], "scoring": self._scoring()}

    def _scoring(self) -> dict[str, dict]:
        return {m: read_progress(self.strategy.state_dir, m) for m in (keys.QUALITY, keys.DISAGREEMENT)}

    def _records_summary(self, snap: Snapshot) -> dict[str, Any]:
        pick, settings = snap.pick, self.strategy.settings
        return {
            "phase": pick.phase,
            "pick": settings.pick,
            "training": snap.training,
            "model": {"signature": snap.model, "modified": self.strategy.model_time(snap)} if snap.model else None,
            "q0": pick.q0,
            "q0_configured": settings.q0,
            "below_q0": pick.below_q0,
            "volumes": snap.volume_count,
            "annotated_slices": snap.annotated_slices,
            "held_slices": snap.held_slices,
            "pending_volumes": pick.pending,
            "budget": {"budget": settings.budget, "remaining": pick.remaining} if pick.remaining is not None else None,
            "stop": {"reason": pick.stop.reason, "message": pick.stop.message} if pick.stop else None,
        }

    def page(self, datastore: Datastore) -> str:
        snap = self.strategy.snapshot(datastore, with_volumes=True)
        summary = {**self._records_summary(snap), "scoring": self._scoring()}
        history = read_history(self.strategy.state_dir)
        e = _escape
        model = summary["model"]
        values = {
            "refresh": REFRESH_SECONDS,
            "phase": e(summary["phase"]),
            "pick": e(summary["pick"]),
            "model": (f"{e(model['signature'])}, saved {_time(model['modified'])}" if model else "none yet")
            + (" (a training is running)" if snap.training else ""),
            "q0": f"{summary['q0']:.3g}"
            + (
                f" (lowered from {summary['q0_configured']:.3g} by the budget)"
                if summary["q0"] < summary["q0_configured"]
                else ""
            ),
            "annotated": summary["annotated_slices"],
            "held": summary["held_slices"],
            "below_q0": summary["below_q0"],
            "budget": (
                f"{summary['budget']['remaining']} of {summary['budget']['budget']} slices left"
                if summary["budget"]
                else "none"
            ),
            "stop": (
                f'<p class="stop" id="stop">Stop: {e(summary["stop"]["reason"])}: {e(summary["stop"]["message"])}</p>'
                if summary["stop"]
                else ""
            ),
            "scoring": "".join(_progress_row(p) for p in summary["scoring"].values() if p),
            "heldout": _heldout(history, snap.model),
            "volumes": "".join(_volume_row(v, summary["q0"], snap.loop.has_model) for v in snap.volumes),
            "histogram": _histogram([q for v in snap.volumes for q in _open_q(v)], summary["q0"]),
            "dice": _dice_plot(history),
        }
        return TEMPLATE.substitute({k: str(v) for k, v in values.items()})


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _time(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "unknown"


def _progress_row(p: dict) -> str:
    e = _escape
    rate = f"{p['slices_per_second']} slices/s" if p.get("slices_per_second") else ""
    eta = (
        f"about {p['eta_seconds']:.0f} s left"
        if p.get("state") == "running" and p.get("eta_seconds") is not None
        else ""
    )
    return (
        f"<tr><td>{e(p.get('method', ''))}</td><td>{e(p.get('state', ''))}</td><td>{e(p.get('volumes_done', 0))} / "
        f"{e(p.get('volumes_total', 0))}</td><td>{e(rate)}</td><td>{e(eta)}</td><td>{_time(p.get('updated'))}</td></tr>"
    )


def _volume_row(v: VolumeState, q0: float, has_model: bool) -> str:
    open_q = _open_q(v)
    if v.unscorable:
        state = "cannot be scored"
    elif v.q is not None:
        state = "scored"
    else:
        state = "pending" if has_model else "no model"
    lowest = f"{min(open_q):.3f}" if open_q else ""
    return (
        f'<tr><td class="id">{_escape(v.image_id)}</td><td>{len(v.annotated)}</td><td>{len(v.held - v.annotated)}</td>'
        f"<td>{sum(q < q0 for q in open_q)}</td><td>{lowest}</td><td>{state}</td></tr>"
    )


def _heldout(history: list[dict], model: str | None) -> str:
    if not history:
        return "<p>No training finished yet.</p>"
    last, e = history[-1], _escape
    held = last["heldout"]
    dice = held.get("dice")
    text = (
        f"<p>Held-out Dice of the previous model on the {e(held.get('slices', 0))} slices annotated since it was "
        f"trained "
        f'({e(held.get("lesion_slices", 0))} with lesion): <b id="heldout">'
        f"{f'{dice:.3f}' if isinstance(dice, (int, float)) else 'not measured'}</b>.</p>"
    )
    train = last.get("train_dice")
    if isinstance(train, (int, float)):
        which = "the current model" if last.get("model") == model else "the latest training"
        text += f"<p>Training Dice of {which} on its {e(last['slices'])} annotated slices: {train:.3f}.</p>"
    return text


def _histogram(values: list[float], q0: float, bins: int = 10, width: int = 420, height: int = 160) -> str:
    """Inline SVG bar chart of Q over open slices, with q0 marked."""
    if not values:
        return "<p>No Q of the current model yet.</p>"
    counts = [0] * bins
    for q in values:
        counts[min(bins - 1, max(0, int(q * bins)))] += 1
    top, bar = max(counts), (width - 40) / bins
    bars = "".join(
        f'<rect x="{30 + i * bar:.1f}" y="{height - 20 - c / top * (height - 40):.1f}" width="{bar - 2:.1f}" '
        f'height="{c / top * (height - 40):.1f}" class="bar"><title>Q {i / bins:.1f}-{(i + 1) / bins:.1f}: '
        f'{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    x0 = 30 + min(max(q0, 0), 1) * (width - 40)
    return (
        f'<svg id="histogram" width="{width}" height="{height}" role="img" aria-label="Q histogram">{bars}'
        f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="10" y2="{height - 20}" class="q0"/>'
        f'<text x="{x0 + 3:.1f}" y="20">q0</text><text x="30" y="{height - 4}">0</text>'
        f'<text x="{width - 16}" y="{height - 4}">1</text><text x="0" y="20">{top}</text></svg>'
        f"<p>{len(values)} unannotated slices scored by the current model.</p>"
    )


def _dice_plot(history: list[dict], width: int = 420, height: int = 200) -> str:
    """Inline SVG: held-out Dice of each model (x: the slices it was trained on) and training Dice, against annotated
    slices."""
    heldout = [
        (prev["slices"], e["heldout"]["dice"])
        for prev, e in zip(history, history[1:])
        if isinstance(e["heldout"].get("dice"), (int, float))
    ]
    train = [(e["slices"], e["train_dice"]) for e in history if isinstance(e.get("train_dice"), (int, float))]
    if not heldout and not train:
        return "<p>No training history yet.</p>"
    xmax = max(x for x, _ in heldout + train) or 1

    def points(series: list[tuple[int, float]], cls: str) -> str:
        xy = [(30 + x / xmax * (width - 50), height - 20 - min(max(y, 0), 1) * (height - 40)) for x, y in series]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" class="{cls}"/>' for x, y in xy)
        return f'<polyline points="{line}" class="{cls}"/>{dots}' if xy else ""

    return (
        f'<svg id="dice" width="{width}" height="{height}" role="img" aria-label="Dice against annotated slices">'
        f'<line x1="30" x2="{width - 20}" y1="{height - 20}" y2="{height - 20}" class="axis"/>'
        f'<line x1="30" x2="30" y1="20" y2="{height - 20}" class="axis"/>{points(train, "train")}'
        f'{points(heldout, "heldout")}<text x="0" y="24">1</text><text x="0" y="{height - 20}">0</text>'
        f'<text x="{width - 40}" y="{height - 4}">{xmax}</text></svg>'
        f'<p><span class="heldout">&#9679;</span> held-out Dice ({len(heldout)} models) '
        f'<span class="train">&#9679;</span> training Dice ({len(train)})</p>'
    )


def register_status_page() -> None:
    """GET /qunet/: the page, registered once, in a process that serves the endpoints (the server or a TestClient),
    with the access rule of GET /datastore/ (the USER role when MONAI Label's authentication is on)."""
    server = sys.modules.get("monailabel.app")
    if server is None or any(getattr(r, "path", None) == "/qunet/" for r in server.app.routes):
        return

    def status_page(user=Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> HTMLResponse:
        app = app_instance()
        return HTMLResponse(app.loop_status.page(app.datastore()), headers={"Content-Security-Policy": CSP})

    server.app.add_api_route(
        "/qunet/", status_page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False
    )
