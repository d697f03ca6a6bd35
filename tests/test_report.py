"""Eval's report: one comparison figure on the same noise (pixel geometry and contents checked),
the per-run grids in grids/, report.md linking them."""

import json

import numpy as np
import torch
from PIL import Image

from dsno.metrics.image_io import to_uint8
from dsno.stages.comparison import CAPTION_H, GAP, HEADER_H, LABEL_W, PAD, upscale_for
from dsno.stages.report import write_report

N, H = 5, 16
NFES = [1, 2, 3]


def _result(tmp_path):
    g = torch.Generator().manual_seed(0)
    finals = {"reference": torch.rand(N, 1, H, H, generator=g) * 2 - 1}
    rows = []

    def add(method, nfe, **extra):
        x = torch.rand(N, 1, H, H, generator=g) * 2 - 1
        finals[f"{method}@{nfe}"] = x
        rows.append({"method": method, "nfe": nfe, "rmse_vs_reference": float((x - finals["reference"]).square()
                     .mean().sqrt()), "sec_per_sample": 1e-3 * nfe, **extra})

    add("dsno", 1)
    add("teacher (dpm_solver_pp-3)", 12)
    for nfe in NFES:
        add("ddim-1", nfe)
    rows.append({"method": "deis-3", "nfe": 1, "skipped": "needs 2 NFE"})
    add("deis-3", 2)
    add("deis-3", 3)
    add("ddpm", 3, stochastic=True)
    (tmp_path / "grid_old_nfe3.png").write_bytes(b"x")          # a loose grid of an earlier eval
    result = {"experiment": "t", "num_samples": N, "device": "cpu", "rows": rows,
              "reference": {"solver": "dpm_solver_pp-3", "steps": 60, "dtype": "float64"}}
    write_report(result, finals, tmp_path, grid_samples=4)
    return finals


def test_upscale_brings_a_digit_to_64_pixels():
    assert [upscale_for((s, s)) for s in (8, 16, 28, 32, 256)] == [8, 4, 3, 2, 1]


def test_comparison_figure_geometry_contents_and_links(tmp_path):
    finals = _result(tmp_path)
    s = 4                                          # 16 px -> 64 px
    cell = 2 * H * s + GAP                         # 4 samples per cell in a 2 x 2 block
    row_h = cell + CAPTION_H + PAD
    top, solvers, columns = 3, 2, len(NFES)        # reference, teacher, DSNO; ddim-1, deis-3 (ddpm is stochastic)
    figure = np.array(Image.open(tmp_path / "comparison.png").convert("RGB"))
    assert figure.shape == (PAD + (top + solvers) * row_h + HEADER_H, LABEL_W + PAD + columns * (cell + PAD), 3)

    def block(x, y):
        return figure[y:y + H * s, x:x + H * s]

    def upscaled(images, k):
        return np.kron(to_uint8(images[k, 0]).numpy(), np.ones((s, s), np.uint8))

    # DSNO (third top row, first column), its 4th sample: bottom right of the 2 x 2 block
    x, y = LABEL_W + PAD + H * s + GAP, PAD + 2 * row_h + H * s + GAP
    for c in range(3):
        assert np.array_equal(block(x, y)[:, :, c], upscaled(finals["dsno@1"], 3))
    # ddim-1 at NFE 2: first solver row (below the NFE strip), second column, first sample
    x, y = LABEL_W + PAD + (cell + PAD), PAD + top * row_h + HEADER_H
    assert np.array_equal(block(x, y)[:, :, 0], upscaled(finals["ddim-1@2"], 0))
    # deis-3 at NFE 1 was skipped: that cell is blank apart from its "n/a" text
    x, y = LABEL_W + PAD, PAD + (top + 1) * row_h + HEADER_H
    assert (block(x, y) == 255).mean() > 0.95

    md = (tmp_path / "report.md").read_text()
    assert "![comparison](comparison.png)" in md and "4x nearest-neighbour upscaled" in md
    assert "Every run's first 4 samples" in md
    assert "(grids/grid_ddim-1_nfe2.png)" in md
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == sorted(["grid_reference.png", "grid_dsno_nfe1.png", "grid_teacher_dpm_solver_pp-3_nfe12.png",
                            "grid_ddim-1_nfe1.png", "grid_ddim-1_nfe2.png", "grid_ddim-1_nfe3.png",
                            "grid_deis-3_nfe2.png", "grid_deis-3_nfe3.png", "grid_ddpm_nfe3.png"])
    assert not list(tmp_path.glob("grid_*.png"))                  # nothing loose beside report.md
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"][-1]["stochastic"] is True


def test_grid_pixels_are_the_uint8_samples_upscaled(tmp_path):
    finals = _result(tmp_path)
    grid = np.array(Image.open(tmp_path / "grids" / "grid_reference.png").convert("RGB"))
    s, step = 4, (H + 1) * 4                      # 1 px lines between images, upscaled with them
    assert grid.shape == (step + s, 4 * step + s, 3)              # 4 samples in one row
    x = s + 2 * step                                               # third sample
    expected = np.kron(to_uint8(finals["reference"][2, 0]).numpy(), np.ones((s, s), np.uint8))
    assert np.array_equal(grid[s:s + H * s, x:x + H * s, 1], expected)


def test_rgb_samples_keep_their_colours(tmp_path):
    from dsno.stages.comparison import Figure, save_comparison
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    layout = save_comparison(Figure(top=[("reference", x, "")], solvers=[], columns=[]), tmp_path / "c.png")
    assert layout.upscale == 2 and layout.per_cell == 2
    figure = np.array(Image.open(tmp_path / "c.png"))
    x0, y0 = layout.sample_origin(0, 0, 1)
    expected = to_uint8(x[1]).repeat_interleave(2, 1).repeat_interleave(2, 2).permute(1, 2, 0).numpy()
    assert np.array_equal(figure[y0:y0 + 64, x0:x0 + 64], expected)
