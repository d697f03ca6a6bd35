"""Write an evaluation result: metrics.json, report.md, the comparison figure, the per-run sample
grids (in grids/) and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dsno.atomic import atomic_path, atomic_write_text
from dsno.metrics.image_io import to_uint8
from dsno.stages.comparison import Figure, save_comparison, upscale_for

GRID_DIR = "grids"
FIGURE_FILE = "comparison.png"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def equal_nfe_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (method, NFE): RMSE vs reference, FID, KID, IS, seconds per sample."""
    lines = ["| method | NFE | RMSE vs reference | FID | KID | IS | precision / recall | ms / sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['nfe']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['nfe']} | {r['rmse_vs_reference']:.4f} | {_fmt(r.get('fid'), '.2f')} | "
                     f"{_fmt(r.get('kid'), '.4f')} | {_fmt(r.get('is_mean'), '.2f')} | "
                     f"{_fmt(r.get('precision'), '.2f')} / {_fmt(r.get('recall'), '.2f')} | {1e3 * r['sec_per_sample']:.3f} |")
    return "\n".join(lines)


def pivot_table(rows: list[dict[str, Any]], key: str = "rmse_vs_reference", spec: str = ".4f") -> str:
    """Markdown: one line per method, one column per NFE, cells `key` (blank: budget not met)."""
    done = [r for r in rows if "skipped" not in r and r.get(key) is not None]
    nfes = sorted({r["nfe"] for r in done})
    methods = list(dict.fromkeys(r["method"] for r in done))
    cell = {(r["method"], r["nfe"]): r[key] for r in done}
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(format(cell[m, n], spec) if (m, n) in cell else "" for n in nfes) + " |")
    return "\n".join(lines)


def equal_time_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: every run sorted by measured wall-clock per sample, with DSNO's place among them."""
    done = sorted((r for r in rows if "skipped" not in r), key=lambda r: r["sec_per_sample"])
    lines = ["| ms / sample | method | NFE | RMSE vs reference | FID |", "|---:|---|---:|---:|---:|"]
    for r in done:
        name = f"**{r['method']}**" if r["method"] == "dsno" else r["method"]
        lines.append(f"| {1e3 * r['sec_per_sample']:.3f} | {name} | {r['nfe']} | {r['rmse_vs_reference']:.4f} | "
                     f"{_fmt(r.get('fid'), '.2f')} |")
    return "\n".join(lines)


def at_dsno_cost(rows: list[dict[str, Any]]) -> str:
    """One sentence: the best solver run no slower than DSNO, against DSNO."""
    done = [r for r in rows if "skipped" not in r]
    dsno = next((r for r in done if r["method"] == "dsno"), None)
    if dsno is None:
        return ""
    peers = [r for r in done if r["method"] != "dsno" and not r["method"].startswith("teacher")
             and r["sec_per_sample"] <= dsno["sec_per_sample"]]
    if not peers:
        return (f"No solver run was as fast as DSNO ({1e3 * dsno['sec_per_sample']:.3f} ms/sample); "
                "DSNO is the only method at its cost.")
    best = min(peers, key=lambda r: r["rmse_vs_reference"])
    return (f"At DSNO's measured cost ({1e3 * dsno['sec_per_sample']:.3f} ms/sample), the most accurate solver run "
            f"no slower is {best['method']} at {best['nfe']} NFE ({1e3 * best['sec_per_sample']:.3f} ms/sample): "
            f"RMSE {best['rmse_vs_reference']:.4f} against DSNO's {dsno['rmse_vs_reference']:.4f}.")


def grid_file(key: str) -> str:
    """'deis-3@5' -> 'grid_deis-3_nfe5.png' (no spaces or brackets)."""
    name = key.replace("@", "_nfe").replace(" ", "_").replace("(", "").replace(")", "")
    return f"grid_{name}.png"


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, upscale: int = 1) -> None:
    """x: [N, C, H, W] in [-1, 1] -> PNG grid (1 px black lines; each pixel upscale x upscale)."""
    import torchvision
    from PIL import Image
    grid = torchvision.utils.make_grid(to_uint8(x.detach().cpu()), nrow=nrow, padding=1)     # [3, H', W']
    grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def reference_caption(ref: dict[str, Any]) -> str:
    """'dpm_solver_pp-3, 500 steps, float64' (or the solver, its tolerance and dtype for an adaptive one)."""
    parts = [str(ref["solver"])]
    if "steps" in ref:
        parts.append(f"{ref['steps']} steps")
    if "rtol" in ref:
        parts.append(f"rtol {ref['rtol']:g}")
    return ", ".join([*parts, str(ref.get("dtype", "float64"))])


def comparison_figure(result: dict[str, Any], finals: dict[str, torch.Tensor]) -> Figure:
    """What eval's comparison figure shows: the reference, the teacher solve and DSNO, then every
    deterministic solver row (stochastic ones follow other noise) at each NFE it ran at."""
    done = [r for r in result["rows"] if "skipped" not in r]
    ref = result["reference"]
    top = [(f"reference: {reference_caption(ref)}", finals["reference"], "")]

    def run(r: dict[str, Any]) -> tuple[torch.Tensor, str]:
        return finals[f"{r['method']}@{r['nfe']}"], f"RMSE {r['rmse_vs_reference']:.4f}"

    top += [(f"{r['method']}: NFE {r['nfe']}", *run(r)) for r in done if r["method"].startswith("teacher")]
    top += [("DSNO: one pass", *run(r)) for r in done if r["method"] == "dsno"]
    solvers: dict[str, dict[int, tuple[torch.Tensor, str]]] = {}
    for r in done:
        if r["method"] != "dsno" and not r["method"].startswith("teacher") and not r.get("stochastic"):
            solvers.setdefault(r["method"], {})[r["nfe"]] = run(r)
    columns = sorted({nfe for runs in solvers.values() for nfe in runs})
    return Figure(top=top, solvers=list(solvers.items()), columns=columns)


def save_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "skipped" not in r]
    methods = sorted({r["method"] for r in done})
    paths = []
    metrics = [("rmse_vs_reference", "RMSE vs float64 reference")] + \
        ([("fid", "FID (digit features)")] if any(r.get("fid") is not None for r in done) else [])
    for key, label in metrics:
        for xkey, xlabel, name in (("nfe", "NFE (model evaluations)", "nfe"),
                                   ("sec_per_sample", "measured seconds per sample", "wallclock")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in methods:
                pts = sorted((r[xkey], r[key]) for r in done if r["method"] == m and r.get(key) is not None)
                if pts:
                    xs, ys = zip(*pts)
                    style = dict(marker="*", markersize=14, linestyle="none") if m == "dsno" else dict(marker="o")
                    ax.plot(xs, ys, label=m, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = out / f"plot_{key.split('_')[0]}_vs_{name}.png"
            with atomic_path(p) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
            plt.close(fig)
            paths.append(p)
    return paths


def write_report(result: dict[str, Any], finals: dict[str, torch.Tensor], out: Path, grid_samples: int = 64) -> None:
    """Into `out`: metrics.json, report.md, comparison.png, the plots, and grids/grid_<method>_nfe<k>.png
    for every run (grids of an earlier eval there, or loose in `out`, are removed)."""
    out.mkdir(parents=True, exist_ok=True)
    grids = out / GRID_DIR
    grids.mkdir(exist_ok=True)
    names = {grid_file(k) for k in finals}
    for stale in [*out.glob("grid_*.png"), *(p for p in grids.glob("grid_*.png") if p.name not in names)]:
        stale.unlink()
    upscale = upscale_for(next(iter(finals.values())).shape[-2:]) if finals else 1
    for key, x in finals.items():
        save_grid(x[:grid_samples], grids / grid_file(key), upscale=upscale)
    layout = save_comparison(comparison_figure(result, finals), out / FIGURE_FILE)
    plots = save_plots(result["rows"], out)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    md = [f"# Evaluation: {result['experiment']}", "",
          f"{result['num_samples']} samples from the same noise for every method; reference: "
          f"{reference_caption(result['reference'])}. "
          f"Device: {result['device']}.", "",
          "## Samples (same noise)", "",
          f"The first {layout.per_cell} samples of every method, {layout.upscale}x nearest-neighbour upscaled, with "
          "each run's RMSE against the reference; stochastic solvers are left out (their samples follow other noise). "
          f"Every run's first {min(grid_samples, result['num_samples'])} samples: `{GRID_DIR}/`.", "",
          f"![comparison]({FIGURE_FILE})", "",
          "## Quality at equal NFE", "", "RMSE of the final sample against the reference:", "",
          pivot_table(result["rows"]), "", "FID against the real digits (digit-classifier features):", "",
          pivot_table(result["rows"], "fid", ".1f"), "", "Every run:", "", equal_nfe_table(result["rows"]), "",
          "## Quality at equal wall-clock", "", at_dsno_cost(result["rows"]), "", equal_time_table(result["rows"]), "",
          "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + \
         ["", "## Every run's samples", ""] + \
         [f"- {k}: [{GRID_DIR}/{grid_file(k)}]({GRID_DIR}/{grid_file(k)})" for k in finals]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
