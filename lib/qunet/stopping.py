"""Next sample's stop signal: when more annotation is unlikely to pay, said in every answer (`Pick.stop`).

Reasons: `budget_spent` (nothing left of `budget`), `no_slice_below_q0` (every volume is scored by the current
model and no unannotated slice is below q0) or `agreement_flattened` (the agreement statistic of the current model
differs from the previous model's by less than `stop_tolerance`: more labels stopped changing how the model agrees
with itself; slices are still offered).
"""

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from qunet.config import SelectionConfig


@dataclass(frozen=True)
class Stop:
    reason: str  # budget_spent, no_slice_below_q0, agreement_flattened
    message: str


def agreement(q_values: Sequence[float]) -> float | None:
    """How well a model agrees with itself on open slices: the median Q over those where its levels 3 and 4 differ
    at all (Q < 1). Slices where both heads see nothing have Q = 1 and would pin a plain median at 1 on stacks where
    most slices hold no lesion. None when no slice disagrees."""
    disagreeing = [q for q in q_values if q < 1]
    return statistics.median(disagreeing) if disagreeing else None


def stop_signal(
    has_model: bool,
    agreements: Sequence[float | None],
    settings: SelectionConfig,
    remaining: int | None,
    below: int,
    pending: int,
) -> Stop | None:
    """The stop to report, if any. `agreements`: `agreement()` of each model's scores, oldest first; `remaining`:
    budget left (None without one); `below`: open slices below q0 in volumes the current model scored; `pending`:
    volumes it has not scored yet."""
    if remaining == 0:
        return Stop("budget_spent", f"the budget of {settings.budget} slices is annotated or held")
    if not has_model:
        return None
    if not pending and not below:
        return Stop("no_slice_below_q0", "no unannotated slice has Q below q0 for the current model")
    last = [a for a in agreements[-2:] if a is not None]
    if settings.stop_tolerance > 0 and len(last) == 2 and abs(last[1] - last[0]) < settings.stop_tolerance:
        return Stop(
            "agreement_flattened",
            f"the model's agreement changed by {abs(last[1] - last[0]):.3f} (< "
            f"{settings.stop_tolerance}) since the previous model",
        )
    return None
