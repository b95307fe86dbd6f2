"""What the app keeps in the datastore's image info, under one key each."""

from typing import Any

from monailabel.interfaces.datastore import Datastore

QUALITY = "qunet_quality"  # per-slice quality metrics and the S0 pick, with the image signature they belong to
DISAGREEMENT = "qunet_disagreement"  # per-slice Q with the model and image signatures they belong to
ANNOTATED = "qunet_annotated"  # slice indices covered by submitted labels
SERVED = "qunet_served"  # {client_id: {"slices": [...], "ts": seconds}}: slices handed out by Next sample
ERROR = "qunet_error"  # why the image cannot be scored, if it cannot


def annotated(datastore: Datastore, image_id: str, info: dict[str, Any], depth: int) -> list[int]:
    """Annotated slices; a label that came without the app's bookkeeping (imported) annotates all of them."""
    if ANNOTATED in info:
        return info[ANNOTATED]
    return list(range(depth)) if datastore.get_label_by_image_id(image_id, "final") else []


def rounded(values, digits: int = 5) -> list:
    """JSON-friendly per-slice values; NaN (not scored) becomes None."""
    return [None if v != v else round(float(v), digits) for v in values]
