"""Infer task `qunet`: the U-net++'s level-4 output, slice by slice, as a label volume on the image's grid."""

from typing import Any

import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from qunet import build_network, segment
from qunet.io import load_stack

from lib.conf import AppConf


class QUNetInfer(BasicInferTask):
    def __init__(self, path: list[str], conf: AppConf) -> None:
        super().__init__(
            path=path,
            network=build_network(conf.features, out_channels=len(conf.labels)),
            type=InferType.SEGMENTATION,
            labels=conf.label_map(),
            dimension=3,  # volumes in and out; the network itself is 2D
            description="QU-net++ (2D U-net++, deep supervision): level-4 segmentation of every slice",
            config={"batch_size": conf.score_batch_size},
        )
        self.conf = conf

    def pre_transforms(self, data=None) -> list:
        return []  # qunet.io.load_stack reads and checks the stack in run_inferer

    def post_transforms(self, data=None) -> list:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        stack = load_stack(data["image_path"])
        network = self._get_network(device, data)
        label = segment(network, stack.array, self.conf.image_size, int(data.get("batch_size", 16)), torch.device(device))
        data["image"] = MetaTensor(torch.from_numpy(stack.array), affine=torch.from_numpy(stack.affine))
        data["pred"] = MetaTensor(torch.from_numpy(label), affine=torch.from_numpy(stack.affine))
        return data
