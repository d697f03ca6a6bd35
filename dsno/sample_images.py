"""Write samples of an exported DSNO sampler as PNGs and an .npz, resumably.

    python -m dsno.sample_images sampler=PATH n=50000 out=DIR [seed=0 batch_size=256 form=auto chunk_size=1000
                                                        trust_program=false labels=...]

labels= (a class-conditional sampler needs it, an unconditional one refuses it): image i gets class
cycle[i % len(cycle)], where the cycle is [K] for labels=K (every image class K), the list for
labels=[3,1,4], and [0, 1, ..., num_classes - 1] for labels=all (equal counts when num_classes divides n).
DIR/labels.npy holds each image's class (int64 [n], image i = png/i.png and samples[i]), and
run.json the cycle.

Output: DIR/png/000000.png ... (uint8, data_range mapped to 0..255, grayscale or RGB) and
DIR/samples.npz with the uint8 array `samples` [n, H, W, C] (the layout FID tools take).
The work runs in chunks of `chunk_size` images; chunk c draws its noise from
torch.Generator().manual_seed(chunk_seed(seed, c)), so it depends only on (seed, c). Each
chunk's PNGs, its DIR/chunks/NNNNN.npy and then DIR/chunks/NNNNN.sha256 (the .npy's digest)
are written atomically (temp file + fsync + rename); a chunk counts as complete only when its
.npy matches its digest, so a rerun after an interruption skips complete chunks, redoes a
tampered or truncated one, rewrites any PNG whose bytes differ, and produces the same bytes.
DIR/run.json records what the chunks were made with; a rerun with a different sampler, form,
seed, chunk_size, noise rule or labels is refused. out= must be new, empty or a folder this command wrote
(png/, chunks/, run.json, samples.npz, labels.npy): another folder, a link or an unwritable place is refused
in one line before any sampling.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dsno.atomic import (atomic_path, atomic_write_bytes, claim_output_folder, make_folder,
                         refuse_link)
from dsno.errors import UserError, report_errors
from dsno.export import parse_options
from dsno.inputs import InputError, check_class_labels
from dsno.jsonfile import read_json_file
from dsno.metrics.image_io import to_uint8
from dsno.progress import counter
from dsno.sampler import CONFIG_FILE, FORM_FILES, MAX_SAMPLES, Sampler, load_sampler
from dsno.seeding import CHUNK, index_seed

LABELS_HELP = ("labels=K (every image class K), labels=[3,1,4] (image i gets entry i mod the list's length) "
               "or labels=all (image i gets class i mod num_classes)")
USAGE = ("usage: python -m dsno.sample_images sampler=PATH n=N out=DIR "
         f"[seed=0 batch_size=256 form=auto chunk_size=1000 trust_program=false labels=...]; {LABELS_HELP}, "
         "for a class-conditional sampler only")
MAX_SEED = 2**63 - 1
RUN_FILE = "run.json"
PNG_DIR, CHUNK_DIR, NPZ_FILE, LABELS_FILE = "png", "chunks", "samples.npz", "labels.npy"
TEMP_FILE = re.compile(r"\..+\.\d+\.tmp")  # dsno.atomic's default temp name: .NAME.PID.tmp
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: the .npz bytes depend only on the samples


NOISE_RULE = "chunk c: torch.Generator().manual_seed(blake2b-64(seed, c, person=dsno.chunk))"


def chunk_seed(seed: int, chunk: int) -> int:
    """A 64-bit generator seed that depends only on (seed, chunk) (`dsno.seeding.index_seed`)."""
    return index_seed(seed, chunk, CHUNK)


def label_cycle(labels: Any, num_classes: int | None, sampler: str | os.PathLike) -> list[int] | None:
    """The classes image i cycles through (image i gets cycle[i % len(cycle)]) for labels= an int, a list of
    ints or "all" (see LABELS_HELP); None for an unconditional sampler. One InputError line otherwise."""
    owner = f"the sampler at {sampler}"
    if num_classes is None:     # None, or the one-line refusal of labels
        return check_class_labels(labels, None, name=f"labels={labels!r}", owner=owner)
    if labels is None:
        raise InputError(f"{owner} is class-conditional ({num_classes} classes): pass {LABELS_HELP}")
    labels = labels.tolist() if isinstance(labels, (np.ndarray, np.generic, torch.Tensor)) else labels
    cycle = list(range(num_classes)) if labels == "all" else list(labels) if isinstance(labels, (list, tuple)) \
        else [labels]
    if not cycle or not all(isinstance(k, int) and not isinstance(k, bool) for k in cycle):
        raise InputError(f"labels={labels!r}: need integer classes in [0, {num_classes}); {LABELS_HELP}")
    return check_class_labels(cycle, num_classes, name=f"labels={labels!r}", owner=owner).tolist()


def to_pixels(images: torch.Tensor, data_range: Sequence[float]) -> np.ndarray:
    """[N, C, H, W] floats in data_range -> uint8 [N, H, W, C] (`dsno.metrics.image_io.to_uint8`)."""
    return to_uint8(images, tuple(data_range)).permute(0, 2, 3, 1).numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] with C = 1 or 3 -> PNG file bytes."""
    from PIL import Image  # deferred: loads Pillow only when used
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_npz(path: Path, chunk_files: Sequence[Path], shape: Sequence[int]) -> None:
    """Stream the chunk arrays into path (an .npz with one uint8 array `samples`), atomically."""
    info = zipfile.ZipInfo("samples.npy", date_time=ZIP_DATE)
    info.external_attr = 0o644 << 16
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive, \
            archive.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunk_files:
            f.write(np.load(chunk, allow_pickle=False).tobytes())


def _run_record(sampler: Sampler, seed: int, chunk_size: int, cycle: list[int] | None) -> dict[str, Any]:
    folder, form = Path(sampler.path), sampler.form
    digest = hashlib.sha256((folder / CONFIG_FILE).read_bytes())
    with open(folder / FORM_FILES[form], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = {"sampler": str(folder.resolve()), "sampler_sha256": digest.hexdigest(), "form": form,
              "seed": seed, "chunk_size": chunk_size, "noise": NOISE_RULE}
    if cycle is not None:       # a class-conditional sampler's; image i has class labels[i % len(labels)]
        record.update(labels=cycle, label_rule=f"image i: labels[i % {len(cycle)}] (also in {LABELS_FILE})")
    return record


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    path = out / RUN_FILE
    refuse_link(path)
    if path.is_file():
        previous = read_json_file(path, UserError, "delete it, or use a new out= directory", expect=dict)
        keys = ("sampler_sha256", "form", "seed", "chunk_size", "noise", "labels")
        changed = [k for k in keys if previous.get(k) != record.get(k)]
        if changed:
            raise UserError(f"{out} holds samples made with different {', '.join(changed)} "
                             f"({', '.join(f'{k}={previous.get(k)!r}' for k in changed)}); "
                             "use a new out= directory or delete this one")
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def not_image_folder_files(out: Path) -> list[str]:
    """The entries of `out` that make it other than a folder this module wrote (run.json, png/,
    chunks/, samples.npz, labels.npy, temp files; png/ and chunks/ only beside run.json unless empty);
    [] for one."""
    names = os.listdir(out)
    other = [n for n in names if n not in (PNG_DIR, CHUNK_DIR, RUN_FILE, NPZ_FILE, LABELS_FILE)
             and not TEMP_FILE.fullmatch(n)]
    filled = [n for n in (PNG_DIR, CHUNK_DIR)      # a link among them is refused by name when written
              if (out / n).is_dir() and not (out / n).is_symlink() and any((out / n).iterdir())]
    return other or ([] if RUN_FILE in names else filled)


def _remove_stale_temp_files(*folders: Path) -> None:
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            if TEMP_FILE.fullmatch(tmp.name) and not tmp.is_symlink():
                tmp.unlink()


def write_samples(sampler_path: str | os.PathLike, n: int, out: str | os.PathLike, seed: int = 0,
                  batch_size: int = 256, form: str = "auto", chunk_size: int = 1000,
                  progress: bool = True, trust_program: bool = False, labels: Any = None) -> Path:
    """Write n samples to out/png and out/samples.npz (resuming complete chunks); returns the .npz path.
    labels: a class-conditional sampler's (an int, a list of ints cycled over the images, or "all";
    see `label_cycle`), written to out/labels.npy."""
    for key, value, lo, hi in (("n", n, 1, MAX_SAMPLES), ("batch_size", batch_size, 1, 65536),
                               ("chunk_size", chunk_size, 1, 10**6), ("seed", seed, 0, MAX_SEED)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"{key}={value!r}: must be an integer in [{lo}, {hi}] (n is capped at {MAX_SAMPLES:,} "
                            "images, chunk_size at a million, batch_size at 65,536, seed below 2**63)")
    sampler = load_sampler(sampler_path, form, trust_program=trust_program)
    cycle = label_cycle(labels, sampler.num_classes, sampler_path)
    channels, (height, width) = sampler.data_channels, sampler.state_shape[1:]
    if channels not in (1, 3):
        raise UserError(f"PNG output needs 1 (grayscale) or 3 (RGB) channels, the sampler makes {channels}")
    out = claim_output_folder(out, "out", not_image_folder_files, create=True)
    png_dir, chunk_dir = make_folder(out / PNG_DIR), make_folder(out / CHUNK_DIR)
    _remove_stale_temp_files(out, png_dir, chunk_dir)
    _check_run_record(out, _run_record(sampler, seed, chunk_size, cycle))
    image_labels = None if cycle is None else torch.tensor(cycle).repeat(-(-n // len(cycle)))[:n]

    num_chunks = -(-n // chunk_size)
    chunk_files = [chunk_dir / f"{c:05d}.npy" for c in range(num_chunks)]
    with counter("sampling", n, progress) as advance:
        for c, chunk_file in enumerate(chunk_files):
            start = c * chunk_size
            count = min(chunk_size, n - start)
            images = _load_complete_chunk(chunk_file, (count, height, width, channels))
            made = images is None
            if made:
                chunk_labels = None if image_labels is None else image_labels[start:start + count]
                samples = sampler.sample(count, seed=chunk_seed(seed, c), batch_size=batch_size, labels=chunk_labels)
                images = to_pixels(samples, sampler.data_range)
            for i, image in enumerate(images):
                png, data = png_dir / f"{start + i:06d}.png", png_bytes(image)
                if made or not png.is_file() or png.read_bytes() != data:
                    atomic_write_bytes(png, data)
            if made:
                data = npy_bytes(images)
                atomic_write_bytes(chunk_file, data)
                atomic_write_bytes(_digest_file(chunk_file), hashlib.sha256(data).hexdigest().encode())
            advance(count)
    npz = out / NPZ_FILE
    write_npz(npz, chunk_files, (n, height, width, channels))
    if image_labels is not None:
        atomic_write_bytes(out / LABELS_FILE, npy_bytes(image_labels.numpy()))
    return npz


def _digest_file(chunk_file: Path) -> Path:
    return chunk_file.with_suffix(".sha256")


def _load_complete_chunk(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The chunk's images when its .npy is whole (matches its digest, shape and dtype), else None."""
    digest = _digest_file(path)
    if not (path.is_file() and digest.is_file()):
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest().encode() != digest.read_bytes().strip():
        return None
    try:
        images = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        return None
    return images if images.shape == shape and images.dtype == np.uint8 else None


@dataclass
class SampleOptions:
    """`python -m dsno.sample_images` options (see the module doc)."""

    sampler: str = "???"
    n: int = "???"  # type: ignore[assignment]
    out: str = "???"
    seed: int = 0
    batch_size: int = 256
    form: str = "auto"
    chunk_size: int = 1000
    trust_program: bool = False
    labels: Any = None      # a class-conditional sampler's: an int, a list of ints or "all" (LABELS_HELP)


def main(argv: Sequence[str] | None = None) -> None:
    with report_errors("the sample chunks written so far are kept; the same command resumes from them"):
        opts = parse_options(SampleOptions, sys.argv[1:] if argv is None else argv, USAGE)
        npz = write_samples(opts.sampler, opts.n, opts.out, seed=opts.seed, batch_size=opts.batch_size,
                            form=opts.form, chunk_size=opts.chunk_size, trust_program=opts.trust_program,
                            labels=opts.labels)
    labels = npz.parent / LABELS_FILE
    also = f" and {labels} (each image's class)" if labels.is_file() else ""
    print(f"wrote {npz} and {npz.parent / PNG_DIR}/{also}")


if __name__ == "__main__":
    main()
