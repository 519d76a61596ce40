"""`opdlab compare`: several objectives from the same student, the same number of steps, several seeds.

    opdlab compare                                   # opd, reverse_kl, jsd (beta 0.5), lsm; 3 seeds; demo config
    opdlab compare --objectives opd lsm --seeds 2 train.steps=30 train.lr=3e-5

Each (objective, seed) is one ordinary `train()` run of the demo config (`opdlab/configs/demo.yaml`, plus any
key=value overrides) under OUT/NAME/seed-S, with `train.eval_every` set so the run's metrics hold an accuracy curve.
The student before training is evaluated once per seed. Writes OUT/compare.json (every number), OUT/compare.png
(loss and held-out mean@k against step, one line per objective: mean over seeds with a min-max band) and prints a
table of mean@k before / after (mean ± std over seeds) with the spread of the loss over the last quarter of steps
as a stability figure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opdlab.config import RunConfig
from opdlab.evaluate import evaluate
from opdlab.experiments.demo import demo_config_path
from opdlab.experiments.pairs import prepare_models_of
from opdlab.models.loading import load_model
from opdlab.run import load_run_config
from opdlab.runtime import autocast, resolve_device, resolve_precision
from opdlab.tasks import make_task
from opdlab.train import train

# name -> extra overrides; jsd at beta 0.5 is the symmetric middle of the family (beta 0 / 1 are the two KLs)
DEFAULT_OBJECTIVES = {"opd": [], "reverse_kl": [], "jsd": ["objective.divergence.beta=0.5"], "lsm": []}


def _curve(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_compare(objectives: list[str], seeds: list[int], overrides: list[str], out: Path,
                console: Console | None = None) -> dict:

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    base: RunConfig = load_run_config(demo_config_path(), overrides)
    prepare_models_of(base, console=console)
    eval_every = base.train.eval_every or max(1, base.train.steps // 4)
    device = resolve_device(base.device)
    precision = resolve_precision(base.train.precision, device)
    task = make_task(base.task)
    k = base.eval.k
    student, tok = load_model(base.student, device, precision=precision)
    with autocast(precision, device):
        before_results = {s: evaluate(student, tok, task, base.eval, seed=s, progress=False) for s in seeds}
    before = {s: r.mean_at_k for s, r in before_results.items()}
    del student
    console.print(f"student before: mean@{k} " + ", ".join(f"{v:.1%} (seed {s})" for s, v in before.items()))
    results: dict = {"config": base.model_dump(mode="json"), "k": k, "before": before, "runs": {},
                     "before_by_length": {s: {b.label: b.mean_reward for b in r.buckets if b.mean_reward is not None}
                                          for s, r in before_results.items()}}
    for name in objectives:
        extra = DEFAULT_OBJECTIVES.get(name, [])
        for seed in seeds:
            run_dir = out / name / f"seed-{seed}"
            cfg = load_run_config(demo_config_path(), [*overrides, f"objective.name={name}", *extra,
                                                   f"train.seed={seed}", f"train.eval_every={eval_every}",
                                                   f"run_dir={run_dir}"])
            console.print(f"[bold]{name}[/bold] seed {seed}: {cfg.train.steps} steps -> {run_dir}")
            if run_dir.exists():  # a fresh run each time: the table must not mix in an older one
                shutil.rmtree(run_dir)
            train(cfg)
            steps, loss = _curve(run_dir, "train/loss")
            eval_steps, acc = _curve(run_dir, f"eval/mean@{k}")
            results["runs"].setdefault(name, {})[seed] = {
                "loss": [steps, loss], "mean_at_k": [eval_steps, acc], "after": acc[-1] if acc else None,
                "after_by_length": _last_by_length(run_dir, k)}
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    console.print(summary_table(results))
    console.print(length_table(results))
    console.print(f"wrote {out / 'compare.json'} and {plot_compare(results, out / 'compare.png')}")
    return results


def _last_by_length(run_dir: Path, k: int) -> dict[str, float]:
    """The last evaluation's mean@k by response-length bucket, from the run's metrics."""
    prefix, last = f"eval/mean@{k}_len_", {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        found = {key[len(prefix):]: v for key, v in row.items() if key.startswith(prefix)}
        last = found or last
    return last


def length_table(results: dict) -> Table:
    """mean@k by response-length bucket (tokens), before and after each objective, mean over seeds (a bucket's
    count differs between models, since each model's own responses fill it)."""
    k = results["k"]
    rows = {"before": list(results["before_by_length"].values())}
    rows.update({name: [r["after_by_length"] for r in runs.values()] for name, runs in results["runs"].items()})
    labels = list(dict.fromkeys(lab for per_seed in rows.values() for d in per_seed for lab in d))
    table = Table(title=f"mean@{k} by response length (tokens), mean over seeds that have the bucket")
    table.add_column("student", justify="left")
    for lab in labels:
        table.add_column(lab, justify="right")
    for name, per_seed in rows.items():
        cells = []
        for lab in labels:
            vals = [d[lab] for d in per_seed if lab in d]
            cells.append(f"{statistics.fmean(vals):.1%}" if vals else "-")
        table.add_row(name, *cells)
    return table


def summary_table(results: dict) -> Table:
    k = results["k"]
    b_mean, b_std = _mean_std(list(results["before"].values()))
    table = Table(title=f"objectives from the same student, mean ± std over {len(results['before'])} seeds")
    for col in ("objective", f"mean@{k} before", f"mean@{k} after", "change", "loss std, last quarter"):
        table.add_column(col, justify="right" if col != "objective" else "left")
    for name, runs in results["runs"].items():
        after = [r["after"] for r in runs.values() if r["after"] is not None]
        a_mean, a_std = _mean_std(after)
        tails = []
        for r in runs.values():
            losses = r["loss"][1]
            tail = losses[-max(2, len(losses) // 4):]
            tails.append(statistics.pstdev(tail))
        table.add_row(name, f"{b_mean:.1%} ± {b_std:.1%}", f"{a_mean:.1%} ± {a_std:.1%}", f"{a_mean - b_mean:+.1%}",
                      f"{statistics.fmean(tails):.3f}")
    return table


def plot_compare(results: dict, path: Path) -> Path:
    from matplotlib.figure import Figure  # lazy: matplotlib only when plotting

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, runs in results["runs"].items():
        for ax, key in ((ax_loss, "loss"), (ax_acc, "mean_at_k")):
            curves = [r[key] for r in runs.values()]
            steps = curves[0][0]
            n = min(len(c[1]) for c in curves)
            if n == 0:
                continue
            cols = list(zip(*(c[1][:n] for c in curves)))
            mean = [statistics.fmean(c) for c in cols]
            line, = ax.plot(steps[:n], mean, label=name)
            ax.fill_between(steps[:n], [min(c) for c in cols], [max(c) for c in cols], alpha=0.2,
                            color=line.get_color())
    ax_loss.set(title="training loss (own objective)", xlabel="step")
    ax_acc.set(title=f"held-out mean@{results['k']}", xlabel="step")
    ax_acc.axhline(statistics.fmean(results["before"].values()), color="gray", ls="--", label="before")
    ax_acc.legend()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdlab compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES), help="objective names")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config, e.g. train.steps=30")
    args = p.parse_args(argv)
    # `--objectives opd lsm train.lr=1e-4`: the list option swallows what follows it; key=value items are overrides
    objectives = [o for o in args.objectives if "=" not in o]
    overrides = [o for o in args.objectives if "=" in o] + args.overrides
    if not objectives:
        p.error("--objectives needs at least one objective name")
    run_compare(objectives, list(range(args.seeds)), overrides, Path(args.out))
    return 0
