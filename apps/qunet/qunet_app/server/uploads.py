"""Uploads, as MONAI Label's endpoints receive them, made safe; these replace its endpoint helpers
(qunet_app.server.gate).

MONAI Label's helpers save an upload to the temporary folder under a name ending in the client's suffix (a long
suffix is a file-system error), and remove it only after a successful answer (a refused upload stayed, and infer
then took it as an image by its path). Here an upload:

- is saved in a private folder that is removed when the request ends, however it ends: under the app's model
  folder (`uploads/<server pid>-*`), where the next start removes the folders of servers no longer running
  (`prepare_uploads`), so a killed server leaves nothing behind, not even in the system's temporary folder;
- is decoded by the one parser that checks it (`qunet.safe_read`) and rewritten as a NIfTI file of the app's
  (`qunet.io.write_canonical`), never kept in the client's bytes or under the client's name: a file that is not a
  single-file NIfTI, NRRD or MetaImage, names another data file, claims more voxels than the cap, inflates beyond
  its header or has no finite geometry is refused (422), and no other reader (pynrrd, ITK, nibabel) ever parses
  the client's bytes, so no parser can read them differently from the checks;
- as infer's input, is the only server path that request may name (`is_uploaded`).

A model upload (PUT /model/qunet, only with --conf allow_model_upload true) must load into the configured network
and is published atomically; DELETE moves the published model aside, as MONAI Label does.
"""

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from fastapi import UploadFile
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import file_checksum

from qunet import build_network
from qunet.io import IMAGE_SUFFIXES, StackError, write_canonical
from qunet.network import load_weights

from qunet_app.datastore.files import atomic_copy
from qunet_app.server.errors import InvalidFile, NotFound, Unprocessable, check_name, json_object
from qunet_app.server.processes import alive

logger = logging.getLogger(__name__)

_uploaded: ContextVar[frozenset[str]] = ContextVar("qunet_uploaded", default=frozenset())
UPLOADS = "uploads"  # in the app's model folder: one folder per request being received


def prepare_uploads(model_dir: str) -> None:
    """At start-up: make the uploads' folder; remove the request folders in it of servers no longer running, and
    this process's own (a restarted server may get the pid of the one killed, as in a container)."""
    root = os.path.join(model_dir, UPLOADS)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not alive(int(pid)):
            logger.warning(f"removing {os.path.join(root, name)}, left by a killed server")
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def is_uploaded(path: Any) -> bool:
    """Whether `path` is the file uploaded with the request being answered."""
    return isinstance(path, str) and path in _uploaded.get()


@contextlib.contextmanager
def received(upload: UploadFile, what: str, kind: str = "image") -> Iterator[str]:
    """The upload rewritten as a NIfTI file (kinds "image" and "label"), OHIF's raw voxels (".bin", kind "label"),
    or as sent (kind "model"), in a private folder removed afterwards."""
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=os.path.join(app_instance().model_dir, UPLOADS))
    try:
        path = os.path.join(folder, "upload")
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        if kind == "model":
            yield path
        elif kind == "label" and (upload.filename or "").lower().endswith(".bin"):
            os.rename(path, path + ".bin")  # OHIF sends a label as the raw voxels of the image's grid (DICOMweb)
            yield path + ".bin"
        else:
            try:
                write_canonical(path, os.path.join(folder, "canonical.nii.gz"))
            except StackError as e:
                raise InvalidFile(f"{what} rejected: {str(e).replace(path, 'the uploaded file')}") from None
            os.remove(path)
            yield os.path.join(folder, "canonical.nii.gz")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _image_id(filename: str | None) -> str:
    name = os.path.basename(filename or "")
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), os.path.splitext(name)[1])
    return name[: len(name) - len(suffix)]


def save_label(
    background_tasks,
    image: str,
    params: str = "{}",
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile | None = None,
    user: str | None = None,
) -> dict:
    save_params = json_object(params, "params")
    if user:
        save_params["user"] = user
    instance = app_instance()
    with received(label, f"label for {image!r}", "label") as path:
        tag = tag or DefaultLabelTag.FINAL.value
        label_id = instance.datastore().save_label(image, path, tag, save_params)
    return {**(instance.on_save_label(image, label_id, tag) or {}), "image": image, "label": label_id}


def add_image(
    background_tasks,
    image: str | None = None,
    params: str = "{}",
    file: UploadFile | None = None,
    user: str | None = None,
) -> dict:
    image_id = check_name(image or _image_id(file.filename), "image id")
    save_params = json_object(params, "params")
    if user:
        save_params["user"] = user
    with received(file, f"image {image_id!r}") as path:
        return {"image": app_instance().datastore().add_image(image_id, path, save_params)}


def run_inference(
    original: Callable,
    background_tasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = "{}",
    file: UploadFile | None = None,
    label: UploadFile | None = None,
    output=None,
):
    if not file:
        return original(background_tasks, model, image, session_id, params, file, label, output)
    with received(file, "the uploaded image") as path:
        token = _uploaded.set(frozenset({path}))
        try:
            return original(background_tasks, model, path, session_id, params, None, label, output)
        finally:
            _uploaded.reset(token)


def update_model(background_tasks, model: str, file: UploadFile) -> dict:
    app = app_instance()
    with received(file, "model", "model") as path:
        try:
            load_weights(build_network(app.qconf.features, len(app.qconf.labels)), path, "cpu")
        except ValueError as e:
            raise Unprocessable(f"model rejected: {str(e).replace(path, 'the uploaded file')}") from None
        atomic_copy(path, app.published)
    return {"checksum": file_checksum(app.published), "modified_time": int(os.stat(app.published).st_mtime)}


def delete_model(model: str) -> dict:
    app = app_instance()
    if not os.path.isfile(app.published):
        raise NotFound(f"no published model for {model!r}")
    os.replace(app.published, f"{app.published}.{time.strftime('%Y%m%d_%H%M%S')}.deleted")
    return {}
