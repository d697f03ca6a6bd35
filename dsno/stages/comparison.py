"""Eval's comparison figure: the same noise through every method, one picture.

Rows, top to bottom: the float64 reference, the teacher solve, DSNO (each in the first column),
a strip of NFE headers, then one row per deterministic eval solver with its NFE budgets side by
side. A cell holds the first `per_cell` samples (a near-square block, each image upscaled by
nearest neighbour) over a caption with the RMSE against the reference. A class-conditional run's
figure has no top rows: one row per class label, one column per method (its title in the header
strip), each cell that method's first sample of that label.

    layout = Layout((16, 16), upscale=4, per_cell=4, top_rows=3, solver_rows=9, columns=10)
    layout.size                     # (width, height) in pixels
    layout.sample_origin(row, col, k)   # top-left (x, y) of sample k of a cell

`Layout` and `compose` are pure; `save_comparison` draws the labels and writes the PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dsno.atomic import atomic_path
from dsno.metrics.image_io import to_uint8

LABEL_W = 200      # px: the row-label column
PAD = 8            # px: around and between cells
GAP = 2            # px: between the samples of one cell
CAPTION_H = 16     # px: the RMSE line under a cell
HEADER_H = 24      # px: the NFE strip above the solver rows
TARGET_PX = 64     # an image is upscaled to at least this many pixels on its longer side
PER_CELL = 4       # samples per cell
BACKGROUND = 255
GAP_VALUE = 160


def upscale_for(image_hw: Sequence[int], target: int = TARGET_PX) -> int:
    """Integer nearest-neighbour factor that brings the longer side to >= target px (16 -> 4)."""
    return max(1, -(-target // max(image_hw)))


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of the figure. image_hw: one sample's (H, W); rows count top rows first."""

    image_hw: tuple[int, int]
    upscale: int
    per_cell: int
    top_rows: int
    solver_rows: int
    columns: int
    header_h: int = HEADER_H

    @property
    def block(self) -> tuple[int, int]:
        """(samples across, samples down) in one cell."""
        across = math.ceil(math.sqrt(self.per_cell))
        return across, math.ceil(self.per_cell / across)

    @property
    def cell_wh(self) -> tuple[int, int]:
        """(width, height) of a cell's image block, caption excluded."""
        (h, w), s, (across, down) = self.image_hw, self.upscale, self.block
        return across * w * s + (across - 1) * GAP, down * h * s + (down - 1) * GAP

    @property
    def row_h(self) -> int:
        return self.cell_wh[1] + CAPTION_H + PAD

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole figure in pixels."""
        width = LABEL_W + PAD + self.columns * (self.cell_wh[0] + PAD)
        return width, PAD + (self.top_rows + self.solver_rows) * self.row_h + self.header_h

    def header_y(self) -> int:
        return PAD + self.top_rows * self.row_h

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left (x, y) of the image block of cell (row, col); row < top_rows: a top row."""
        y = PAD + row * self.row_h + (self.header_h if row >= self.top_rows else 0)
        return LABEL_W + PAD + col * (self.cell_wh[0] + PAD), y

    def sample_origin(self, row: int, col: int, k: int) -> tuple[int, int]:
        """Top-left (x, y) of sample k (row-major in the cell's block)."""
        x, y = self.cell_origin(row, col)
        (h, w), s, (across, _) = self.image_hw, self.upscale, self.block
        return x + (k % across) * (w * s + GAP), y + (k // across) * (h * s + GAP)


def to_rgb_pixels(images: torch.Tensor, upscale: int) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, H*s, W*s, 3] (nearest; gray is repeated, C not in
    (1, 3) is averaged to gray)."""
    x = to_uint8(images.detach().cpu())
    if x.shape[1] != 3:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if x.shape[1] != 1 else x
        x = x.expand(-1, 3, -1, -1)
    x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def compose(layout: Layout, cells: dict[tuple[int, int], torch.Tensor]) -> np.ndarray:
    """The figure's pixels, labels aside: uint8 [height, width, 3], white, with each cell's first
    `per_cell` samples ([N, C, H, W] in [-1, 1]) at its place."""
    width, height = layout.size
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    (h, w), s = layout.image_hw, layout.upscale
    cw, ch = layout.cell_wh
    for (row, col), images in cells.items():
        x0, y0 = layout.cell_origin(row, col)
        canvas[y0:y0 + ch, x0:x0 + cw] = GAP_VALUE
        for k, pixels in enumerate(to_rgb_pixels(images[:layout.per_cell], s)):
            x, y = layout.sample_origin(row, col, k)
            canvas[y:y + h * s, x:x + w * s] = pixels
    return canvas


@dataclass
class Figure:
    """What the figure shows: the top rows, the solver rows and the columns.
    top: [(label, images, caption)]; solvers: [(label, {column: (images, caption)})]; columns: NFE budgets
    (headed "NFE k") or titles (a conditional figure's methods, headed by their names); corner: the text
    at the head of the row labels."""

    top: list[tuple[str, torch.Tensor, str]]
    solvers: list[tuple[str, dict[int | str, tuple[torch.Tensor, str]]]]
    columns: list[int | str]
    corner: str = "solver  \\  NFE"

    def header_lines(self, width: int) -> list[list[str]]:
        """Each column's header as lines of at most `width` px ("NFE k" for a budget, a title wrapped)."""
        return [[f"NFE {c}"] if isinstance(c, int) else _wrap(str(c), _font(11), width) for c in self.columns]

    def layout(self, per_cell: int = PER_CELL) -> Layout:
        shape = next(iter(self.cells().values()))[0].shape
        hw = (int(shape[-2]), int(shape[-1]))
        n = min(per_cell, int(shape[0]))
        base = Layout(hw, upscale_for(hw), n, len(self.top), len(self.solvers), max(1, len(self.columns)))
        titles = [] if all(isinstance(c, int) for c in self.columns) else self.header_lines(base.cell_wh[0])
        lines = max((len(t) for t in titles), default=1)
        return replace(base, header_h=HEADER_H + 13 * (lines - 1))

    def cells(self) -> dict[tuple[int, int], tuple[torch.Tensor, str]]:
        out = {(i, 0): (images, caption) for i, (_, images, caption) in enumerate(self.top)}
        for j, (_, runs) in enumerate(self.solvers):
            for nfe, run in runs.items():
                out[len(self.top) + j, self.columns.index(nfe)] = run
        return out


def _font(size: int = 12):
    from PIL import ImageFont  # deferred: loads Pillow only when used
    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int) -> list[str]:
    """Split text at spaces (a word wider than `width` px anywhere) into lines of at most `width` px."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while len(line) > 1 and font.getlength(line) > width:
            cut = next(i for i in range(len(line) - 1, 0, -1) if font.getlength(line[:i]) <= width or i == 1)
            lines.append(line[:cut])
            line = line[cut:]
    return lines + ([line] if line else [])


def save_comparison(figure: Figure, path: Path, per_cell: int = PER_CELL) -> Layout:
    """Draw `figure` (pixels, row labels, NFE headers, RMSE captions) and write it to `path` as PNG,
    atomically. Returns its layout."""
    from PIL import Image, ImageDraw  # deferred: loads Pillow only when used
    layout = figure.layout(per_cell)
    cells = figure.cells()
    image = Image.fromarray(compose(layout, {k: v[0] for k, v in cells.items()}))
    draw, font, small = ImageDraw.Draw(image), _font(12), _font(11)
    cw, ch = layout.cell_wh
    labels = [label for label, _, _ in figure.top] + [label for label, _ in figure.solvers]
    for row, label in enumerate(labels):
        _, y = layout.cell_origin(row, 0)
        lines = _wrap(label, font, LABEL_W - 2 * PAD)[: max(1, ch // 14)]
        top = y + max(0, (ch - 14 * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((PAD, top + 14 * i), line, fill=(0, 0, 0), font=font)
    y = layout.header_y()
    draw.text((PAD, y + 5), figure.corner, fill=(0, 0, 0), font=font)
    for col, (column, lines) in enumerate(zip(figure.columns, figure.header_lines(cw))):
        x, _ = layout.cell_origin(layout.top_rows, col)
        face = font if isinstance(column, int) else small
        for i, text in enumerate(lines):
            draw.text((x + (cw - face.getlength(text)) / 2, y + 5 + 13 * i), text, fill=(0, 0, 0), font=face)
    for (row, col), (_, caption) in cells.items():
        x, y = layout.cell_origin(row, col)
        draw.text((x, y + ch + 2), caption, fill=(60, 60, 60), font=small)
    for j, (_, runs) in enumerate(figure.solvers):
        for col, nfe in enumerate(figure.columns):
            if nfe not in runs:
                x, y = layout.cell_origin(layout.top_rows + j, col)
                draw.text((x + cw / 2 - 8, y + ch / 2 - 6), "n/a", fill=(150, 150, 150), font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return layout
