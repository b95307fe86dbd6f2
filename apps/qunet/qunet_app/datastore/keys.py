"""What the app keeps in the datastore's image and label info, under one key each, and which keys clients may not
set."""

from collections.abc import Iterable
from typing import Any

from monailabel.interfaces.datastore import Datastore

QUALITY = "qunet_quality"  # per-slice quality metrics and the S0 pick, with the image signature they belong to
DISAGREEMENT = "qunet_disagreement"  # per-slice Q with the model and image signatures they belong to
ANNOTATED = "qunet_annotated"  # slice indices covered by submitted labels
SERVED = "qunet_served"  # {client_id: {"slices": [...], "ts": seconds}}: slices handed out by Next sample
ERROR = "qunet_error"  # why the image cannot be scored, if it cannot
ERROR_SOURCE = "qunet_error_source"  # file signature the error in ERROR was found for

# Keys the app (or MONAI Label for it) writes into image or label info, besides its own "qunet_" ones: the strategy's
# record, file bookkeeping, and what the DICOMweb datastore copies from the series (its labels' SEG uid picks the
# label). A client setting one could break Next sample, scoring or a restart for everyone.
OWN_PREFIX = "qunet_"
OWN_KEYS = frozenset(
    {
        "strategy",
        "ts",
        "name",
        "path",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "Modality",
        "SeriesDescription",
        "RetrieveURL",
        "DicomPatientID",
    }
)
RECORDS_FILE = "qunet_records.sqlite"  # in the datastore's folder: the keys below, one transaction per change
STRATEGY = "strategy"  # MONAI Label's record of the last Next sample, rewritten with every answer


def in_records(key: str) -> bool:
    """Whether an image-info key is kept in the app's SQLite records rather than in MONAI Label's datastore JSON:
    everything the app writes per Next sample or per scored volume."""
    return key.startswith(OWN_PREFIX) or key == STRATEGY


MAX_SERVED_EXPIRED = 32  # expired served-slice records kept per image (a late label still finds what was served)


ANONYMOUS = "anonymous"  # the client id of a client that sends none (the stock MONAILabelClient sends null)
MAX_CLIENT_ID = 128  # characters: ids are keys of the served-slice records, which every Next sample rewrites


def client_id(value: Any) -> str:
    """A request's client id: missing, null or empty is the anonymous client; ValueError for anything but a short
    string or integer."""
    if value is None or value == "":
        return ANONYMOUS
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > MAX_CLIENT_ID:
        raise ValueError(f"client_id must be a string of at most {MAX_CLIENT_ID} characters, got {str(value)[:40]!r}")
    return str(value)


def protected(keys: Iterable[Any]) -> list[str]:
    """The keys among `keys` that only the app may write."""
    return sorted(str(k) for k in keys if str(k).startswith(OWN_PREFIX) or str(k) in OWN_KEYS)


def pruned_served(served: dict[str, dict], now: float, hold_seconds: float, written: set[str]) -> dict[str, dict]:
    """The served-slice records to keep: those being written, every hold still running, and the newest
    MAX_SERVED_EXPIRED expired ones."""
    expired = sorted(
        (k for k, v in served.items() if k not in written and now - v.get("ts", 0) >= hold_seconds),
        key=lambda k: served[k].get("ts", 0),
        reverse=True,
    )
    dropped = set(expired[MAX_SERVED_EXPIRED:])
    return {k: v for k, v in served.items() if k not in dropped}


def annotated(datastore: Datastore, image_id: str, info: dict[str, Any], depth: int) -> list[int]:
    """Annotated slices; a label that came without the app's bookkeeping (imported) annotates all of them."""
    if ANNOTATED in info:
        return info[ANNOTATED]
    return list(range(depth)) if datastore.get_label_by_image_id(image_id, "final") else []


def rounded(values, digits: int = 5) -> list:
    """JSON-friendly per-slice values; NaN (not scored) becomes None."""
    return [None if v != v else round(float(v), digits) for v in values]
