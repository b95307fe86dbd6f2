"""Infer task `qunet`: the U-net++'s level-4 output, slice by slice, as a label volume on the image's grid, post-
processed as `--conf postprocess` says (qunet.postprocess).

Answers a clear 4xx instead of a 500 when it cannot: 409 while there is no model (or the model file is corrupt
or was trained with other `features`/`labels`), 422 for an image that cannot be read, 400 for bad params.
"""

import logging
from typing import Any

import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from qunet import build_network, segment
from qunet.io import StackError, file_signature, load_stack
from qunet.network import load_weights, prepare
from qunet.postprocess import postprocess

from qunet_app.server.errors import BadRequest, Conflict, InvalidFile, as_bool, as_level, check_device
from qunet_app.settings import AppConf

logger = logging.getLogger(__name__)

NO_MODEL = "no trained model yet: train first or set --conf pretrained_path"
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
DTYPES = ("uint8", "int16", "uint16", "int32", "float32")


class QUNetInfer(BasicInferTask):
    def __init__(self, path: list[str], conf: AppConf) -> None:
        super().__init__(
            path=path,
            network=build_network(conf.features, out_channels=len(conf.labels)),
            type=InferType.SEGMENTATION,
            labels=conf.label_map(),
            dimension=3,  # volumes in and out; the network itself is 2D
            description="QU-net++ (2D U-net++, deep supervision): level-4 segmentation of every slice",
        )
        self.conf = conf

    def __call__(self, request, callbacks=None):
        request = dict(request)
        request["device"] = check_device(request.get("device", self._config.get("device")))
        request["logging"] = as_level(request.get("logging", "INFO"))
        if request.get("result_extension") not in (None, "", *EXTENSIONS):
            raise BadRequest(
                f"result_extension must be one of {', '.join(EXTENSIONS)}, got {request['result_extension']!r}"
            )
        if request.get("result_dtype") not in (None, *DTYPES):
            raise BadRequest(f"result_dtype must be one of {', '.join(DTYPES)}, got {request['result_dtype']!r}")
        for key in ("result_compress", "skip_writer"):
            if key in request:
                request[key] = as_bool(request[key], key)
        request["result_write_to_file"] = True
        if not isinstance(request.get("image"), str) or not request["image"]:
            raise BadRequest("infer needs an image id (or an uploaded file)")
        return super().__call__(request, callbacks)

    def pre_transforms(self, data=None) -> list:
        return []  # qunet.io.load_stack reads and checks the stack in run_inferer

    def post_transforms(self, data=None) -> list:
        return []

    def _get_network(self, device, data):
        """The published model (else pretrained_path), loaded once per file version and device; 409 if unusable."""
        path = self.get_path()
        if not path:
            raise Conflict(NO_MODEL)
        try:
            version = (path, file_signature(path))
        except FileNotFoundError:  # removed since get_path looked
            raise Conflict(NO_MODEL) from None
        cached = self._networks.get(device)
        if cached and cached[1] == version:
            return cached[0]
        try:
            network = load_weights(build_network(self.conf.features, len(self.conf.labels)), path, device)
        except ValueError as e:  # unreadable, or trained with other features or labels
            raise Conflict(f"the model cannot be used: {e}") from e
        network = prepare(network, torch.device(device))
        self._networks[device] = (network, version)
        return network

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        network = self._get_network(device, data)  # first: no model is the likelier problem, and cheaper to find
        try:
            stack = load_stack(data["image_path"])
        except StackError as e:
            raise InvalidFile(f"image cannot be segmented: {e}") from e
        label = postprocess(
            segment(network, stack.array, self.conf.patch_size, device=torch.device(device)), self.conf.postprocess
        )
        data["image"] = MetaTensor(torch.from_numpy(stack.array), affine=torch.from_numpy(stack.affine))
        data["pred"] = MetaTensor(torch.from_numpy(label), affine=torch.from_numpy(stack.affine))
        return data
