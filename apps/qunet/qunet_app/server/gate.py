"""What MONAI Label's endpoints do before they reach the app: every request checked, uploads received safely, the
endpoints the app does not use switched off, and every request body bounded.

MONAI Label has no exception handlers and parses client values in its endpoint code (a malformed form field is a
500). `install(app)` changes, in a process that serves the endpoints (the server, or an in-process TestClient), and
idempotently across app reloads:

- the endpoint helpers (`monailabel.endpoints.datastore.save_label`, ...), which its routes look up at call time:
  each is wrapped with a check raising a 4xx HTTPException; the upload helpers are replaced by
  `qunet_app.server.uploads`;
- every request, at the outermost layer (`Gate`): a body limit (413 above it: uploads what the voxel cap allows,
  anything else SMALL_BODY), and some checks made before the body is read: the endpoints the app does not use
  (batch and WSI infer, sessions, the dataset archive, the app reload) answer 404; model uploads and deletions 403
  unless --conf allow_model_upload true (404 for an unknown model); the DICOMweb proxy only with a DICOMweb
  studies URL, and no '..' in proxy or OHIF paths; image ids in the query that could not name a file answer 400.
"""

import functools
import inspect
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.utils.app import app_instance
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from qunet_app.datastore import keys
from qunet_app.server import uploads
from qunet_app.server.errors import (
    SMALL_BODY,
    BadRequest,
    ClientError,
    ImageNotFound,
    LabelNotFound,
    check_name,
    check_tag,
    json_object,
)
from qunet_app.tasks.train import check_train_request

UPLOAD_OVERHEAD = 4 << 20  # bytes an upload may hold beyond max_voxels 8-byte voxels: headers, multipart fields
CHECKSUMS = ("SHA256", "SHA512", "MD5")  # what MONAI Label's file_checksum computes


def known_image(datastore: Datastore, image_id: Any) -> bool:
    if not isinstance(image_id, str) or not image_id:
        return False
    try:
        uri = datastore.get_image_uri(image_id)
        return bool(uri) and os.path.exists(uri)
    except (ImageNotFoundException, ClientError, ValueError):  # ValueError: a NUL byte in a path
        return False


def _no_own_keys(info: dict) -> None:
    own = keys.protected(info)
    if own:
        raise ClientError(f"{', '.join(own)}: the app's own records cannot be set by a client", 403)


# ---- checks of the endpoint helpers' arguments -----------------------------------------------------------------


def _check_save_label(args: dict) -> None:
    _no_own_keys(json_object(args.get("params"), "params"))
    check_tag(args.get("tag") or "final")
    if not known_image(app_instance().datastore(), args.get("image")):
        raise ImageNotFound(args.get("image"))


def _check_params(args: dict) -> None:
    _no_own_keys(json_object(args.get("params"), "params"))


def _check_info(args: dict) -> None:
    _no_own_keys(json_object(args.get("info"), "info"))


def _check_image_known(args: dict) -> None:
    if args.get("image") not in app_instance().datastore().list_images():
        raise ImageNotFound(args.get("image"))


def _check_label_known(args: dict) -> None:
    if not app_instance().datastore().get_label_by_image_id(args.get("label"), args.get("tag")):
        raise LabelNotFound(args.get("label"), args.get("tag"))


def _check_download_image(args: dict) -> None:
    fields = str(args.get("check_sum") or "SHA256:").split(":")
    if len(fields) > 2 or len(fields) == 2 and fields[0] not in CHECKSUMS:
        raise BadRequest(f"check_sum must be [ALGORITHM:]digest with ALGORITHM one of {', '.join(CHECKSUMS)}")


def _check_infer(args: dict) -> None:
    app = app_instance()
    app._known("model", args.get("model"), app._infers)
    json_object(args.get("params"), "params")
    if args.get("session_id"):
        raise BadRequest("sessions are switched off in this app: send the image with the request, or its id")
    if args.get("label"):
        raise BadRequest("this app's infer takes no label")
    if not args.get("file") and not args.get("image"):
        raise BadRequest("infer needs an image id (query parameter image) or an uploaded file")
    if args.get("output") == "dicom_seg" and not hasattr(app.datastore(), "_client"):
        raise BadRequest("output=dicom_seg needs a DICOMweb datastore")


def _task_params(args: dict, kind: str, key: str, tasks: dict) -> dict:
    """The params of a request for one task: a JSON object that cannot name another task."""
    app_instance()._known(kind, args.get(key), tasks)
    params = args.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"params must be a JSON object, got {type(params).__name__}")
    if key in params and params[key] != args.get(key):
        raise BadRequest(f"params.{key} must match the {kind} in the path")
    return params


def _check_train(args: dict) -> None:
    check_train_request(_task_params(args, "trainer", "model", app_instance()._trainers))


def _check_scoring(args: dict) -> None:
    _task_params(args, "scoring method", "method", app_instance()._scoring_methods)


def _per_task(check: Callable[[dict], None], key: str) -> Callable[[dict], None]:
    """The legacy POST /train/ and /scoring/ take {task name: its params}: each is checked as its own request."""

    def check_all(args: dict) -> None:
        params = args.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"params must be a JSON object, got {type(params).__name__}")
        for name, task_params in params.items():
            check({key: name, "params": task_params})

    return check_all


def _check_sample(args: dict) -> None:
    app = app_instance()
    app._known("strategy", args.get("strategy"), app._strategies)
    params = args.get("params") or {}
    if "strategy" in params and params["strategy"] != args.get("strategy"):
        raise BadRequest("params.strategy must match the strategy in the path")
    try:
        keys.client_id(params.get("client_id"))
    except ValueError as e:
        raise BadRequest(str(e)) from None


CHECKS: dict[tuple[str, str], Callable[[dict], None]] = {
    ("datastore", "save_label"): _check_save_label,
    ("datastore", "add_image"): _check_params,
    ("datastore", "update_image_info"): _check_info,
    ("datastore", "update_label_info"): _check_info,
    ("datastore", "get_image_info"): _check_image_known,
    ("datastore", "get_label_info"): _check_label_known,
    ("datastore", "download_image"): _check_download_image,
    ("infer", "run_inference"): _check_infer,
    ("train", "run_model"): _check_train,
    ("train", "run"): _per_task(_check_train, "model"),
    ("scoring", "run_method"): _check_scoring,
    ("scoring", "run"): _per_task(_check_scoring, "method"),
    ("activelearning", "sample"): _check_sample,
}
REPLACEMENTS: dict[tuple[str, str], Callable[[Callable], Callable]] = {  # MONAI Label's helper -> the app's
    ("datastore", "save_label"): lambda _: uploads.save_label,
    ("datastore", "add_image"): lambda _: uploads.add_image,
    ("infer", "run_inference"): lambda original: functools.partial(uploads.run_inference, original),
    ("model", "update_model"): lambda _: uploads.update_model,
    ("model", "delete_model"): lambda _: uploads.delete_model,
}


def _guard_helpers() -> None:
    for module_name, name in CHECKS.keys() | REPLACEMENTS.keys():
        module = sys.modules.get(f"monailabel.endpoints.{module_name}")
        if module is None:
            continue
        current = getattr(module, name)
        original = getattr(current, "qunet_original", current)
        signature = inspect.signature(original)
        check = CHECKS.get((module_name, name), lambda args: None)
        implementation = REPLACEMENTS.get((module_name, name), lambda o: o)(original)

        def guarded(*args, __run=implementation, __signature=signature, __check=check, **kwargs):
            __check(__signature.bind(*args, **kwargs).arguments)
            return __run(*args, **kwargs)

        functools.update_wrapper(guarded, original)
        guarded.qunet_original = original
        setattr(module, name, guarded)


# ---- requests refused before the body is read, and bodies bounded --------------------------------------------

Refusal = tuple[int, str] | None
SWITCHED_OFF = re.compile(r"/batch/infer(/[^/]*)?|/infer/wsi(_v2)?/[^/]*|/session/.*|/datastore/dataset|/reload")
UPLOADS = re.compile(r"/datastore/(image|label)?|/infer/[^/]+|/model/[^/]+|/proxy/.*")  # with PUT or POST
ID_QUERIES = ("image", "label", "id")  # query parameters that name an image (labels and deletions name it too)


def _model_change(model: str) -> Refusal:
    app = app_instance()
    if model not in app._infers:
        return 404, f"no model {model!r}; this app has {', '.join(sorted(app._infers))}"
    if not app.qconf.allow_model_upload:
        return 403, "model uploads and deletions are off: start the server with --conf allow_model_upload true"
    return None


def _refusal(method: str, path: str) -> Refusal:
    """Why a request is refused before its body is read, or None. `path` is URL-decoded."""
    parts = path.split("/")
    top = parts[1] if len(parts) > 1 else ""
    if SWITCHED_OFF.fullmatch(path):
        return 404, f"{path} is switched off in this app"
    if len(parts) == 3 and top == "model" and method in ("PUT", "DELETE"):
        return _model_change(parts[2])
    if top == "proxy":
        if not app_instance().studies.startswith(("http://", "https://")):
            return 404, "the DICOMweb proxy is off: the studies are a local folder"
        return (400, "proxy paths may not hold '..' or '%'") if ".." in parts or "%" in path else None
    if top == "ohif" and ".." in parts:
        return 404, "not found"
    if path == "/logs/gpu" and not shutil.which("nvidia-smi"):
        return 404, "no GPU tools (nvidia-smi) on this server"
    return None


def _bad_id(query: bytes) -> Refusal:
    """400 for an image id in the query that could not name a file in the studies folder, wherever one is taken."""
    text = query.decode("utf-8", "surrogateescape")
    for key, value in parse_qsl(text, keep_blank_values=True, errors="surrogateescape"):
        if key in ID_QUERIES:
            try:
                check_name(value, "image id")
            except ClientError as e:
                return e.status_code, e.detail
    return None


async def _validation_error(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own answer puts the request's bytes into JSON, and fails (500) on a body that is not UTF-8."""
    return JSONResponse(
        {
            "detail": [
                {
                    "loc": [str(part) for part in e.get("loc", ())],
                    "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", "")),
                }
                for e in error.errors()
            ]
        },
        status_code=422,
    )


class Gate:
    """Outermost ASGI layer: answers a refusal without reading the request body, else passes the request on with its
    body bounded (Starlette's limit: 413 above it)."""

    def __init__(self, app: Callable, upload_bytes: int) -> None:
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        prefix = settings.MONAI_LABEL_API_STR
        path = scope["path"][len(prefix) :] if prefix and scope["path"].startswith(prefix) else scope["path"]
        found = _refusal(scope["method"], path) or _bad_id(scope.get("query_string", b""))
        if found is not None:
            return await JSONResponse({"detail": found[1]}, status_code=found[0])(scope, receive, send)
        upload = scope["method"] in ("PUT", "POST") and UPLOADS.fullmatch(path)
        limited = RequestBodyLimitMiddleware(self.app, max_body_size=self.upload_bytes if upload else SMALL_BODY)
        await limited(scope, receive, send)


def _gate_requests(upload_bytes: int) -> None:
    server = sys.modules.get("monailabel.app")
    if server is None:  # a scoring or training subprocess: no endpoints
        return
    server.app.exception_handlers[RequestValidationError] = _validation_error
    # built afresh: the stack copies the exception handlers when it is built (it may exist already: a reload)
    server.app.middleware_stack = Gate(server.app.build_middleware_stack(), upload_bytes)


def install(app) -> None:
    """Guard MONAI Label's endpoints for `app` (a QUNetApp)."""
    _guard_helpers()
    _gate_requests(app.qconf.max_voxels * 8 + UPLOAD_OVERHEAD)
