"""Choose the classifier-free guidance scale w of a class-conditional digit teacher by measurement.

For each w: the teacher's DPM-Solver++ 3M solve (20 logSNR steps to t = 1e-3, float32; fixed noise and
balanced labels y = i mod 10), its label accuracy (the digit classifier, dsno.metrics.digit_classifier)
and its FID on digit features against the 5,000 real digits (dsno.metrics.fidelity, as eval computes it).
Picked: the best FID among the w whose label accuracy is >= --min-accuracy (guidance trades diversity,
which FID rewards, for class fidelity).

    python benchmarks/guidance_scale.py                                  # the shipped mnist_unet_cond16
    python benchmarks/guidance_scale.py --guidance 0 1 2 --samples 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsno.metrics.digit_classifier import accuracy, load_digit_classifier
from dsno.metrics.fidelity import compute_fidelity, reference_digits
from dsno.solvers import solve, timesteps
from dsno.teachers.unet import load_unet_teacher

NOISE_SEED = 2026


@torch.no_grad()
def guided_samples(teacher, labels: torch.Tensor, guidance: float, steps: int, batch: int = 256) -> torch.Tensor:
    """The teacher's DPM-Solver++ 3M samples for `labels` [N] at scale `guidance`: [N, C, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    x = torch.randn(len(labels), *teacher.shape, generator=g)
    ts = timesteps(teacher.schedule, steps)
    out = [solve(teacher.conditioned(y, guidance=guidance), xb, ts, solver="dpm_solver_pp", order=3)
           for xb, y in zip(x.split(batch), labels.split(batch))]
    return torch.cat(out).clamp(-1, 1)


def measure(teacher, guidance: list[float], samples: int, steps: int) -> list[dict]:
    """One row per w: guidance, accuracy, fid, seconds."""
    classifier = load_digit_classifier(teacher.shape[-1])
    reference = reference_digits(teacher.shape[-1])
    labels = torch.arange(samples) % teacher.num_classes
    rows = []
    for w in guidance:
        start = time.perf_counter()
        images = guided_samples(teacher, labels, w, steps)
        fid = compute_fidelity(images, reference, extractor="digits", metrics=("fid",))["fid"]
        rows.append({"guidance": w, "accuracy": accuracy(classifier, images, labels), "fid": fid,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"w={w:g}: accuracy {rows[-1]['accuracy']:.4f}, FID {fid:.2f} ({rows[-1]['seconds']} s)", flush=True)
    return rows


def pick(rows: list[dict], min_accuracy: float) -> dict | None:
    """The row with the lowest FID among those with accuracy >= min_accuracy (None when there is none)."""
    ok = [r for r in rows if r["accuracy"] >= min_accuracy]
    return min(ok, key=lambda r: r["fid"]) if ok else None


def table(rows: list[dict], chosen: dict | None) -> str:
    lines = ["| w | label accuracy | FID (digit features) | |", "|---:|---:|---:|---|"]
    for r in rows:
        mark = "chosen" if r is chosen else ""
        lines.append(f"| {r['guidance']:g} | {r['accuracy']:.4f} | {r['fid']:.2f} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=None, help="a train_unet --num-classes weights file "
                                                               "(default: the shipped mnist_unet_cond16)")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--min-accuracy", type=float, default=0.97)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the pick here")
    a = ap.parse_args(argv)
    teacher = load_unet_teacher(a.teacher, size=a.size, conditional=True)
    print(f"{teacher.name}: DPM-Solver++ 3M, {a.steps} logSNR steps, {a.samples} samples (labels i mod 10), "
          f"noise seed {NOISE_SEED}, torch threads {torch.get_num_threads()}", flush=True)
    rows = measure(teacher, a.guidance, a.samples, a.steps)
    chosen = pick(rows, a.min_accuracy)
    print(table(rows, chosen))
    print(f"picked w = {chosen['guidance']:g}" if chosen else f"no w reaches accuracy {a.min_accuracy}")
    if a.json is not None:
        a.json.write_text(json.dumps({"teacher": teacher.fingerprint(), "steps": a.steps, "samples": a.samples,
                                      "rows": rows, "picked": chosen and chosen["guidance"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
