"""Client mistakes as HTTP 4xx answers, and the checks of request values that produce them.

MONAI Label has no exception handlers: any exception escaping an endpoint becomes HTTP 500. FastAPI does turn
`HTTPException` into its status code wherever it is raised, so the app's code paths raise these. They are plain
exceptions outside the server (in the scoring and training subprocesses they fail the task with the message).
"""

import json
import re
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from monailabel.utils.others.generic import name_to_device

from qunet.io import StackError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NAME = re.compile(r"\w[\w.+() -]*")  # one path component: no separators, no leading dot
MAX_NAME_BYTES = 200  # a file name is the name plus a suffix of at most 7 bytes: within the usual 255-byte limit
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
SMALL_BODY = 64 * 1024  # bytes: JSON and form requests (Next sample, train, info updates), and a params field


class ClientError(HTTPException):
    """A request the server cannot carry out because of what the client sent; the detail names the problem."""

    status = 400

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(status_code=status or self.status, detail=detail)

    def __str__(self) -> str:  # the subprocess logs show the message, not "400: ..."
        return self.detail


class BadRequest(ClientError):
    status = 400


class Conflict(ClientError):
    """The request is fine but the server's state does not allow it yet (no model, nothing to train on, ...)."""

    status = 409


class Unprocessable(ClientError):
    """An uploaded file (label, image) or a stored file the request needs cannot be used; the detail says why."""

    status = 422


class InvalidFile(Unprocessable, StackError):
    """An uploaded or stored file that cannot serve as a stack or label (still a StackError for library callers)."""


class ImageNotFound(ClientError, ImageNotFoundException):
    status = 404

    def __init__(self, image_id: Any) -> None:
        msg = f"unknown image id {image_id!r}"
        ClientError.__init__(self, msg)
        ImageNotFoundException.__init__(self, msg)


class LabelNotFound(ClientError, LabelNotFoundException):
    status = 404

    def __init__(self, label_id: Any, tag: Any) -> None:
        msg = f"no label {label_id!r} with tag {tag!r}"
        ClientError.__init__(self, msg)
        LabelNotFoundException.__init__(self, msg)


class NotFound(ClientError):
    status = 404


def check_name(value: Any, what: str) -> str:
    """A file-name component: an id or a file name that stays inside its folder (no '/', '\\', '..', NUL) and fits
    the file system's name limit (255 bytes) with a suffix added; counted in UTF-8 bytes, as the file system does."""
    try:
        size = len(value.encode("utf-8")) if isinstance(value, str) else MAX_NAME_BYTES + 1
    except UnicodeEncodeError:  # a lone surrogate: no file name
        size = MAX_NAME_BYTES + 1
    if not isinstance(value, str) or size > MAX_NAME_BYTES or not NAME.fullmatch(value) or ".." in value:
        raise BadRequest(
            f"{what} {str(value)[:80]!r} is not allowed: use letters, digits and . _ - + ( ) or space, "
            f"no path separators or '..', not starting with a dot, at most {MAX_NAME_BYTES} bytes in UTF-8"
        )
    return value


def check_tag(value: Any) -> str:
    if not isinstance(value, str) or not TAG.fullmatch(value):
        raise BadRequest(f"label tag {value!r} is not allowed: use letters, digits, _ and - (at most 64)")
    return value


def json_object(text: Any, what: str) -> dict:
    """A form field that must hold a JSON object (MONAI Label's `params` and `info`); empty means {}."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    if isinstance(text, (str, bytes)) and len(text) > SMALL_BODY:  # also inside an upload's multipart body
        raise ClientError(f"{what} holds {len(text):,} bytes, more than {SMALL_BODY:,}", 413)
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
    except RecursionError:
        raise BadRequest(f"{what}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def as_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    try:
        number = float(value)
        ok = number.is_integer() and lo <= number <= hi
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise BadRequest(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return int(number)


def as_float(value: Any, what: str, lo: float, hi: float) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not lo <= number <= hi:  # NaN fails too
        raise BadRequest(f"{what} must be a number in [{lo}, {hi}], got {value!r}")
    return number


def as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (
        "true",
        "false",
        "1",
        "0",
        "yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "t",
        "f",
    ):
        return value.strip().lower() in ("true", "1", "yes", "on", "y", "t")
    raise BadRequest(f"{what} must be true or false, got {value!r}")


def as_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LEVELS:
        raise BadRequest(f"logging must be one of {', '.join(LEVELS)}, got {value!r}")
    return value.upper()


def check_device(value: Any) -> str:
    device = name_to_device(value) if value is None or isinstance(value, (str, list)) and value else None
    if not isinstance(device, str):
        raise BadRequest(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if (
        parsed is None
        or parsed.type not in ("cpu", "cuda")
        or parsed.type == "cuda"
        and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count())
    ):
        raise BadRequest(f"device must be 'cpu' or an available 'cuda[:N]', got {value!r}")
    return device
