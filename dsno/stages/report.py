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


def _ms(r: dict[str, Any]) -> str:
    """'3.190 ms (3.101-3.402)': a row's median time per sample and its spread over the timed repeats."""
    spread = (f" ({1e3 * r['sec_per_sample_min']:.3f}-{1e3 * r['sec_per_sample_max']:.3f})"
              if "sec_per_sample_min" in r else "")
    return f"{1e3 * r['sec_per_sample']:.3f}{spread}"


def _kid(r: dict[str, Any]) -> str:
    """KID (its std over subsets after +-), '-' when not computed."""
    if r.get("kid") is None:
        return "-"
    return f"{r['kid']:.4g}" + (f" +- {r['kid_std']:.2g}" if r.get("kid_std") is not None else "")


def has_label_accuracy(rows: list[dict[str, Any]]) -> bool:
    """Whether any run was scored for label accuracy (a conditional run of a digit teacher)."""
    return any(r.get("label_accuracy") is not None for r in rows)


def equal_nfe_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (method, NFE): RMSE vs reference, label accuracy (when scored), FID, KID, IS,
    milliseconds per sample (median, with min-max over the timed repeats) and that cost in teacher evaluations."""
    accuracy = has_label_accuracy(rows)
    head = "| method | NFE | RMSE vs reference |" + (" label accuracy |" if accuracy else "")
    lines = [head + " FID | KID | IS | precision / recall | ms / sample, median (min-max) | measured cost, teacher "
             "evaluations |", "|---|---:|---:|" + ("---:|" if accuracy else "") + "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['nfe']} | skipped: {r['skipped']} | | | | | | |" + (" |" if accuracy else ""))
            continue
        lines.append(f"| {r['method']} | {r['nfe']} | {r['rmse_vs_reference']:.4f} | "
                     + (f"{_fmt(r.get('label_accuracy'), '.3f')} | " if accuracy else "")
                     + f"{_fmt(r.get('fid'), '.2f')} | {_kid(r)} | {_fmt(r.get('is_mean'), '.2f')} | "
                     f"{_fmt(r.get('precision'), '.2f')} / {_fmt(r.get('recall'), '.2f')} | {_ms(r)} | "
                     f"{_fmt(r.get('cost_teacher_evals'), '.3g')} |")
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
    """Markdown: every run sorted by its median wall-clock per sample, with DSNO's place among them."""
    done = sorted((r for r in rows if "skipped" not in r), key=lambda r: r["sec_per_sample"])
    lines = ["| ms / sample, median (min-max) | method | NFE | RMSE vs reference | FID |", "|---:|---|---:|---:|---:|"]
    for r in done:
        name = f"**{r['method']}**" if r["method"] == "dsno" else r["method"]
        lines.append(f"| {_ms(r)} | {name} | {r['nfe']} | {r['rmse_vs_reference']:.4f} | {_fmt(r.get('fid'), '.2f')} |")
    return "\n".join(lines)


VERDICT_METRICS = (("rmse_vs_reference", "RMSE", ".4f"), ("fid", "FID", ".2f"))


def _run(r: dict[str, Any]) -> str:
    return f"{r['method']} at {r['nfe']} NFE"


def cost_key(rows: list[dict[str, Any]]) -> str:
    """What equal cost compares: the measured cost in teacher evaluations when every run has it (each timed
    beside a teacher evaluation, so a load change on the machine cancels), else median seconds per sample."""
    done = [r for r in rows if "skipped" not in r]
    return "cost_teacher_evals" if done and all("cost_teacher_evals" in r for r in done) else "sec_per_sample"


def _cost_text(r: dict[str, Any], key: str, with_time: bool = False) -> str:
    if key == "cost_teacher_evals":
        return f"{r[key]:.2g} teacher evaluations" + (f" ({1e3 * r['sec_per_sample']:.3f} ms/sample median)"
                                                      if with_time else "")
    return f"{1e3 * r[key]:.3f} ms/sample median"


def _overlap(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether two rows' cost spreads (min-max over the timed repeats) overlap."""
    lo = max(a.get(f"{key}_min", a[key]), b.get(f"{key}_min", b[key]))
    return lo <= min(a.get(f"{key}_max", a[key]), b.get(f"{key}_max", b[key]))


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's headline: DSNO against the eval solvers, per metric (RMSE vs the reference; FID when
    computed), at equal cost (solver runs of at most DSNO's measured cost, `cost_key`) and where it loses
    (the cheapest solver run that beats it). Stochastic solvers are left out of RMSE (they follow other
    noise); the teacher solve is no baseline. Markdown bullet lines; [] without a DSNO row."""
    done = [r for r in rows if "skipped" not in r]
    dsno = next((r for r in done if r["method"] == "dsno"), None)
    if dsno is None:
        return []
    solvers = [r for r in done if r["method"] != "dsno" and not r["method"].startswith("teacher")]
    key = cost_key([dsno, *solvers])
    lines = []
    for metric, name, spec in VERDICT_METRICS:
        if dsno.get(metric) is None:
            continue
        peers = [r for r in solvers if r.get(metric) is not None
                 and not (metric == "rmse_vs_reference" and r.get("stochastic"))]
        if not peers:
            continue
        mine = format(dsno[metric], spec)
        cheap = [r for r in peers if r[key] <= dsno[key]]
        if not cheap:
            cheapest = min(peers, key=lambda r: r[key])
            lines.append(f"- **{name} at equal cost**: no solver run is as cheap as DSNO ({_cost_text(dsno, key, True)}); "
                         f"the cheapest, {_run(cheapest)}, costs {cheapest[key] / dsno[key]:.2g}x DSNO's with {name} "
                         f"{format(cheapest[metric], spec)} against DSNO's {mine}.")
        else:
            best = min(cheap, key=lambda r: r[metric])
            noise = (" (their cost spreads overlap: equal within the timing's noise)" if _overlap(best, dsno, key)
                     else "")
            lines.append(f"- **{name} at equal cost**: DSNO {'wins' if dsno[metric] < best[metric] else 'loses'}: "
                         f"{mine} at {_cost_text(dsno, key, True)}, against {format(best[metric], spec)} of the best solver "
                         f"run no costlier, {_run(best)} ({_cost_text(best, key)}){noise}.")
        better = sorted((r for r in peers if r[metric] < dsno[metric]), key=lambda r: r[key])
        if better:
            first, best = better[0], min(better, key=lambda r: r[metric])
            beaten = [f"the cheapest {_run(first)}: {name} {format(first[metric], spec)} against DSNO's {mine}, at "
                      f"{first[key] / dsno[key]:.2g}x DSNO's cost"]
            if best is not first:
                beaten.append(f"the best {_run(best)}: {format(best[metric], spec)}, at {best[key] / dsno[key]:.2g}x")
            lines.append(f"- **Where DSNO loses in {name}**: to {len(better)} of {len(peers)} solver runs; "
                         + "; ".join(beaten) + ".")
        else:
            lines.append(f"- **{name}**: no solver run evaluated (up to {max(r['nfe'] for r in peers)} NFE) beats DSNO.")
    return lines


TEACHER_FID_TARGET = 1.2     # DSNO's FID within this factor of its teacher solve's: the paper's claim, reached


def teacher_ratio(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """DSNO's FID and RMSE beside the teacher solve's on the same eval noise (which no training trajectory
    uses: eval.seed draws it, the data stage draws from (seed, index)): {"dsno_fid", "teacher_fid",
    "fid_ratio", "target", "met", "teacher", "teacher_nfe"}; None without both rows' FIDs."""
    done = [r for r in rows if "skipped" not in r]
    dsno = next((r for r in done if r["method"] == "dsno"), None)
    teacher = next((r for r in done if r["method"].startswith("teacher")), None)
    if dsno is None or teacher is None or dsno.get("fid") is None or not teacher.get("fid"):
        return None
    ratio = dsno["fid"] / teacher["fid"]
    return {"dsno_fid": dsno["fid"], "teacher_fid": teacher["fid"], "fid_ratio": ratio, "target": TEACHER_FID_TARGET,
            "met": ratio <= TEACHER_FID_TARGET, "teacher": teacher["method"], "teacher_nfe": teacher["nfe"]}


def teacher_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's line on DSNO against the teacher it distils (FID on held-out noise); [] without one."""
    r = teacher_ratio(rows)
    if r is None:
        return []
    return [f"- **Teacher gap**: DSNO's FID {r['dsno_fid']:.2f} is {r['fid_ratio']:.2f}x the teacher solve's "
            f"{r['teacher_fid']:.2f} ({r['teacher']} at {r['teacher_nfe']} NFE) on the same eval noise, which no "
            f"training trajectory used: the {r['target']:g}x target is {'met' if r['met'] else 'missed'}."]


def grid_file(key: str) -> str:
    """'deis-3@5' -> 'grid_deis-3_nfe5.png' (no spaces or brackets)."""
    name = key.replace("@", "_nfe").replace(" ", "_").replace("(", "").replace(")", "")
    return f"grid_{name}.png"


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, upscale: int = 1) -> None:
    """x: [N, C, H, W] in [-1, 1] -> PNG grid (1 px black lines; each pixel upscale x upscale)."""
    import torchvision  # deferred: loads torchvision only when used
    from PIL import Image  # deferred: loads Pillow only when used
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


def label_figure(result: dict[str, Any], finals: dict[str, torch.Tensor], labels: torch.Tensor) -> Figure:
    """A conditional run's comparison figure: one row per class label asked for, one column per method (the
    reference, the teacher solve, DSNO, then each deterministic solver at its budget nearest DSNO's measured
    cost); a cell holds that method's first sample of the row's label (the same noise and label in every
    column)."""
    done = [r for r in result["rows"] if "skipped" not in r]
    dsno = next((r for r in done if r["method"] == "dsno"), None)
    target = dsno.get("cost_teacher_evals", 1) if dsno is not None else 1
    columns: dict[str, str] = {"reference": "reference"}
    columns.update({f"{r['method']}@{r['nfe']}": f"{r['method']}, NFE {r['nfe']}" for r in done
                    if r["method"].startswith("teacher")})
    if dsno is not None:
        columns["dsno@1"] = "DSNO, one pass"
    solvers: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        if r["method"] != "dsno" and not r["method"].startswith("teacher") and not r.get("stochastic"):
            solvers.setdefault(r["method"], []).append(r)
    for method, runs in solvers.items():
        r = min(runs, key=lambda r: (abs(r["nfe"] - target), r["nfe"]))
        columns[f"{method}@{r['nfe']}"] = f"{method}, NFE {r['nfe']}"
    rows = []
    for c in sorted(set(labels.tolist())):
        first = int((labels == c).nonzero()[0])
        rows.append((f"label {c}", {title: (finals[key][first:first + 1], "") for key, title in columns.items()}))
    return Figure(top=[], solvers=rows, columns=list(columns.values()), corner="label  \\  method")


def plot_x(r: dict[str, Any], xkey: str) -> float:
    """A run's x in a plot: its NFE, or for DSNO its measured cost in teacher evaluations (not its one pass);
    or its median seconds per sample."""
    if xkey == "nfe" and r["method"] == "dsno" and r.get("cost_teacher_evals") is not None:
        return r["cost_teacher_evals"]
    return r[xkey]


def save_plots(rows: list[dict[str, Any]], out: Path, fid_label: str = "FID") -> list[Path]:
    import matplotlib  # deferred: loads matplotlib only when used
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: loads matplotlib only when used
    done = [r for r in rows if "skipped" not in r]
    methods = sorted({r["method"] for r in done})
    paths = []
    metrics = [("rmse_vs_reference", "RMSE vs float64 reference")] + \
        ([("fid", fid_label)] if any(r.get("fid") is not None for r in done) else [])
    for key, label in metrics:
        for xkey, xlabel, name in (("nfe", "cost in teacher evaluations (solvers: NFE; DSNO: measured)", "nfe"),
                                   ("sec_per_sample", "measured seconds per sample (median)", "wallclock")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in methods:
                pts = sorted((plot_x(r, xkey), r[key]) for r in done if r["method"] == m and r.get(key) is not None)
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


def fidelity_caption(fidelity: dict[str, Any] | None) -> str:
    """What the report's FID is measured against, or why there is none (one sentence, no final stop)."""
    if not fidelity:
        return "FID: this result does not record its reference"
    if not fidelity.get("computed"):
        return f"FID was not computed ({fidelity.get('why', 'no reference')})"
    return f"FID against {fidelity['reference']}, on {fidelity['features']} features"


def conditions_lines(result: dict[str, Any]) -> list[str]:
    """A conditional run's labels and guidance (every method got the same), or [] for an unconditional one."""
    cond = result.get("conditions")
    if not cond:
        return []
    counts = torch.bincount(torch.tensor(cond["labels"]), minlength=len(cond["class_weights"])).tolist()
    accuracy = (f" The reference's label accuracy is {cond['reference_label_accuracy']:.3f}."
                if cond.get("reference_label_accuracy") is not None else "")
    return [f"Class-conditional: every method got the same labels, drawn from eval.seed={cond['seed']} with the "
            f"teacher's class weights (samples per label {counts}), under guidance w={cond['guidance']:g}.{accuracy}",
            ""]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def distillation_lines(result: dict[str, Any]) -> list[str]:
    """The cost of making DSNO, from what data_gen and training recorded (what is missing is said)."""
    cost = result.get("distillation") or {}
    data = (f"data generation {_duration(cost['data_seconds'])} ({cost['num_trajectories']:,} teacher trajectories; "
            "the manifest's first to last write, pauses between resumed runs included)"
            if "data_seconds" in cost else "data generation: not recorded (no complete trajectory manifest at data.dir)")
    train = (f"training {_duration(cost['train_seconds'])} ({cost['train_steps']:,} steps)" if "train_seconds" in cost
             else "training: not recorded (no checkpoints/train_time.json)")
    return [f"- {data}", f"- {train}"]


def write_report(result: dict[str, Any], finals: dict[str, torch.Tensor], out: Path, grid_samples: int = 64,
                 labels: torch.Tensor | None = None) -> None:
    """Into `out`: metrics.json, report.md, comparison.png, the plots, and grids/grid_<method>_nfe<k>.png
    for every run (grids of an earlier eval there, or loose in `out`, are removed). labels: a conditional
    run's class label of each sample [N] (its figure: one row per label)."""
    out.mkdir(parents=True, exist_ok=True)
    grids = out / GRID_DIR
    grids.mkdir(exist_ok=True)
    names = {grid_file(k) for k in finals}
    for stale in [*out.glob("grid_*.png"), *(p for p in grids.glob("grid_*.png") if p.name not in names)]:
        stale.unlink()
    upscale = upscale_for(next(iter(finals.values())).shape[-2:]) if finals else 1
    for key, x in finals.items():
        save_grid(x[:grid_samples], grids / grid_file(key), upscale=upscale)
    figure = comparison_figure(result, finals) if labels is None else label_figure(result, finals, labels)
    layout = save_comparison(figure, out / FIGURE_FILE)
    fidelity = result.get("fidelity")
    fid_label = f"FID ({fidelity['features']})" if fidelity and fidelity.get("computed") else "FID"
    plots = save_plots(result["rows"], out, fid_label)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    teacher_eval = result.get("teacher_eval")
    unit = (f"Equal cost is equal measured cost in teacher evaluations: every method was timed "
            f"{teacher_eval['timing_repeats']} times (median, with min-max in the tables), each time with one teacher "
            f"evaluation right after it, so a change of load on the machine cancels; one teacher evaluation took "
            f"{_ms(teacher_eval)} ms per sample beside DSNO, on {result['device']}."
            if teacher_eval and cost_key(result["rows"]) == "cost_teacher_evals" else
            f"Equal cost is equal median wall-clock per sample on {result['device']}.")
    md = [f"# Evaluation: {result['experiment']}", "",
          "## Verdict: is DSNO better, and at what cost?", "",
          *(verdict_lines(result["rows"]) or ["No DSNO run in this result."]), *teacher_lines(result["rows"]), "",
          unit, "",
          "## What distillation cost", "", *distillation_lines(result), "",
          f"{result['num_samples']} samples from the same noise for every method; reference: "
          f"{reference_caption(result['reference'])}. {fidelity_caption(fidelity)}.", "",
          *conditions_lines(result),
          "## Samples (same noise)", "",
          (f"The first {layout.per_cell} samples of every method, {layout.upscale}x nearest-neighbour upscaled, with "
           "each run's RMSE against the reference; stochastic solvers are left out (their samples follow other noise). "
           if labels is None else
           f"One row per class label: each method's first sample asked for that label (the same noise and label in "
           f"every column), {layout.upscale}x nearest-neighbour upscaled; each solver at its budget nearest DSNO's "
           "measured cost, stochastic solvers left out (their samples follow other noise). ") +
          f"Every run's first {min(grid_samples, result['num_samples'])} samples: `{GRID_DIR}/`.", "",
          f"![comparison]({FIGURE_FILE})", "",
          "## Quality at equal NFE", "", "RMSE of the final sample against the reference:", "",
          pivot_table(result["rows"]), "",
          *(["Label accuracy (the fraction of samples the project's digit classifier assigns to the label asked "
             "for):", "", pivot_table(result["rows"], "label_accuracy", ".3f"), ""]
            if has_label_accuracy(result["rows"]) else []),
          *([fidelity_caption(fidelity) + ":", "", pivot_table(result["rows"], "fid", ".1f"), ""]
            if fidelity and fidelity.get("computed") else [fidelity_caption(fidelity) + ".", ""]),
          "Every run (KID: the squared MMD between the samples' and the real images' features, cubic polynomial "
          "kernel, in the squared units of those features, so comparable only within one feature network; +- its "
          "std over subsets):", "", equal_nfe_table(result["rows"]), "",
          "## Quality at equal wall-clock", "", equal_time_table(result["rows"]), "",
          "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + \
         ["", "## Every run's samples", ""] + \
         [f"- {k}: [{GRID_DIR}/{grid_file(k)}]({GRID_DIR}/{grid_file(k)})" for k in finals]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
