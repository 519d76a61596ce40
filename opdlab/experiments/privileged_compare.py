"""Privileged OPD side by side on the built-in task: SFT on the oracle traces, privileged_full, privileged_partial and
anchored_residual at several lambdas, from the same student, the same number of steps, several seeds.

    opdlab compare-privileged --seeds 3 --steps 60 --out runs/privileged
    opdlab compare-privileged --seeds 1 --steps 20 --lambdas 0.8      # a quick look

The built-in teacher was warm-started on plain prompts only and cannot read an oracle trace in its prompt (given
one, its accuracy falls from ~90 % to under 10 %: the prompt is unlike anything it saw). So the comparison first
makes a *privileged teacher*: the built-in teacher, trained further by `warm_start_privileged_teacher` on the task's
worked solutions under a random view per problem (none, full, partial; `privileged.template`), so that it both
solves problems alone and uses a trace when it has one. Its accuracy under each view is printed and saved. (The
teacher behind docs/results/privileged-builtin.md came from two calls: 300 steps of 16 at lr 5e-4 from the built-in
teacher, then 400 steps of 16 at lr 3e-4 with seed 1 from that, giving 94 % / 82 % / 69 % with the full / partial / no
trace; pass it with --teacher. The defaults here, one call of `--teacher-steps` at 3e-4, were not run.)

Each method then runs from the student at `--student` (default: the cached built-in student), for `--steps` steps of
the demo config (opdlab/configs/demo.yaml, or `--config`) plus any key=value overrides; SFT runs
`opdlab.sft.run_sft` on the same number of batches of the same size at the same learning rate. After training every
student is evaluated on the same held-out problems (the demo's eval config, seed = the run's seed): mean@k, the
shortcut-event rate (`opdlab.tasks.hindsight`), and the late-stage accuracy, mean reward over the longest quarter of the
samples by length. Writes OUT/privileged_compare.json and prints the table (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from opdlab.checkpoint import latest_checkpoint
from opdlab.config import ModelConfig, PrivilegedConfig
from opdlab.evaluate import evaluate
from opdlab.experiments.demo import demo_config_path
from opdlab.models.loading import builtin_dir, load_model
from opdlab.rollout.builtin import sample
from opdlab.run import load_run_config
from opdlab.sft import SFTConfig, run_sft, sft_batch, sft_step
from opdlab.tasks import make_task
from opdlab.tasks.base import ProblemStream
from opdlab.teacher.views import VIEWS, teacher_prompts, view_text
from opdlab.train import train

METHODS = ("sft", "privileged_full", "privileged_partial", "anchored_residual")
LATE_QUANTILE = 0.75  # late-stage accuracy: samples at or above this quantile of response length


def warm_start_privileged_teacher(base: str, out: str | Path, task, cfg: PrivilegedConfig, *, steps: int = 600,
                                  batch_size: int = 32, lr: float = 3e-4, seed: int = 0, progress: bool = True
                                  ) -> Path:
    """Train `base` further on the task's worked solutions, each problem's prompt drawn from the views (none, full,
    partial) uniformly, and save it to `out` (save_pretrained)."""

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model(ModelConfig(path=base), trainable=True)
    stream = ProblemStream(task.problems("train"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    for _ in tqdm(range(steps), desc="privileged teacher", disable=not progress):
        problems = stream.take(batch_size)
        questions = [view_text(p, rng.choice(VIEWS), cfg) for p in problems]
        sft_step(model, opt, sched, sft_batch(tok, task, problems, next(model.parameters()).device,
                                              questions=questions))
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def view_accuracy(model_path: str, task, cfg: PrivilegedConfig, num_problems: int = 100, seed: int = 0
                  ) -> dict[str, float]:
    """Accuracy (one sample per problem, temperature 1) of a model prompted under each view."""
    model, tok = load_model(ModelConfig(path=model_path))
    problems = [task.problems("test")[i] for i in range(num_problems)]
    out = {}
    for view in VIEWS:
        g = torch.Generator().manual_seed(seed)
        r = sample(model, tok, problems, max_new_tokens=96, generator=g,
                   prompts=teacher_prompts(tok, problems, view, cfg))
        out[view] = statistics.fmean(task.verify(p, t) for p, t in zip(problems, r.texts))
    return out


def late_accuracy(result) -> float:
    """Mean reward of the samples whose length is at or above the LATE_QUANTILE quantile of all samples' lengths."""
    pairs = [(n, r) for rec in result.records for n, r in zip(rec.lengths, rec.rewards)]
    lengths = sorted(n for n, _ in pairs)
    cut = lengths[min(len(lengths) - 1, int(LATE_QUANTILE * len(lengths)))]
    return statistics.fmean(r for n, r in pairs if n >= cut)


def _evaluate(path: str, task, eval_cfg, seed: int) -> dict:
    model, tok = load_model(ModelConfig(path=path))
    res = evaluate(model, tok, task, eval_cfg, seed=seed, progress=False)
    return {"mean_at_k": res.mean_at_k, "shortcut_rate": res.extra.get("shortcut_rate"), "late": late_accuracy(res),
            "step_err_first": res.extra.get("step_err_first_quarter"),
            "step_err_last": res.extra.get("step_err_last_quarter")}


def run(args) -> dict:
    console = Console(width=160)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student = args.student or str(builtin_dir("student"))
    config = args.config or demo_config_path()
    base = load_run_config(config, [f"student.path={student}", f"train.steps={args.steps}", *args.overrides])
    task = make_task(base.task)
    t0 = time.perf_counter()
    teacher = Path(args.teacher) if args.teacher else out / "privileged_teacher"
    if not (teacher / "config.json").is_file():
        console.print(f"warm-starting the privileged teacher from {args.base_teacher or builtin_dir('teacher')}")
        warm_start_privileged_teacher(args.base_teacher or str(builtin_dir("teacher")), teacher, task,
                                      base.privileged, steps=args.teacher_steps)
    results = {"teacher": str(teacher), "teacher_views": view_accuracy(str(teacher), task, base.privileged),
               "student_views": view_accuracy(student, task, base.privileged), "config": base.model_dump(mode="json"),
               "runs": {}}
    console.print(f"privileged teacher accuracy by view: {results['teacher_views']}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results["before"] = {s: _evaluate(student, task, base.eval, s) for s in seeds}
    methods = {"sft (oracle traces)": None, "privileged_full": [], "privileged_partial": []}
    methods.update({f"anchored_residual λ={lam}": [f"objective.anchored_residual.lambda={lam}"]
                    for lam in args.lambdas})
    methods = {name: extra for name, extra in methods.items() if name.split(" ")[0] in args.methods}
    for name, extra in methods.items():
        for seed in seeds:
            run_dir = out / name.split(" ")[0].replace("(", "") / (f"lam{extra[0].split('=')[1]}" if extra else "") \
                / f"seed-{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if extra is None:
                cfg = SFTConfig(model=ModelConfig(path=student), task=base.task, steps=args.steps,
                                batch_size=base.rollout.prompts_per_step, lr=base.train.lr,
                                warmup_steps=base.train.warmup_steps, schedule=base.train.schedule, weight_decay=0.0,
                                seed=seed, output_dir=str(run_dir / "model"))
                final = str(run_sft(cfg, progress=False))
            else:
                objective = name.split(" ")[0]
                cfg = load_run_config(config, [
                    f"student.path={student}", f"teacher.path={teacher}", f"train.steps={args.steps}",
                    *args.overrides, f"objective.name={objective}", *extra, f"train.seed={seed}",
                    f"train.save_every={args.steps}", f"run_dir={run_dir}"])
                train(cfg, progress=False)
                final = str(latest_checkpoint(run_dir / "checkpoints") / "model")
            results["runs"].setdefault(name, {})[seed] = _evaluate(final, task, base.eval, seed)
            console.print(f"{name} seed {seed}: {results['runs'][name][seed]}  ({time.perf_counter() - t0:.0f} s)")
            (out / "privileged_compare.json").write_text(json.dumps(results, indent=1))  # partial results survive
    results["wall_s"] = time.perf_counter() - t0
    (out / "privileged_compare.json").write_text(json.dumps(results, indent=1))
    console.print(table(results))
    console.print(f"wrote {out / 'privileged_compare.json'} and {plot(results, out / 'privileged_compare.png')}")
    return results


def _fmt(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1%} ± {sd:.1%}"


def table(results: dict) -> Table:
    k = results["config"]["eval"]["k"]
    t = Table(title=f"privileged OPD on the built-in task, mean ± std over {len(results['before'])} seeds")
    for col in ("method", f"mean@{k}", "shortcut rate", "late-stage acc.", "step err., first quarter",
                "step err., last quarter"):
        t.add_column(col, justify="left" if col == "method" else "right")
    rows = {"student before": results["before"], **results["runs"]}
    for name, runs in rows.items():
        vals = list(runs.values())
        t.add_row(name, *(_fmt([v.get(key) for v in vals]) for key in ("mean_at_k", "shortcut_rate", "late",
                                                                       "step_err_first", "step_err_last")))
    return t


def plot(results: dict, path: Path) -> Path:
    """One panel per column of the table: each method's seeds as dots, their mean as a bar."""
    import matplotlib  # lazy: matplotlib only when plotting
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = {"student before": results["before"], **results["runs"]}
    keys = (("mean_at_k", f"mean@{results['config']['eval']['k']}"), ("shortcut_rate", "shortcut-event rate"),
            ("late", "late-stage accuracy (longest quarter)"))
    fig = Figure(figsize=(13, 4), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(keys)), keys):
        for i, runs in enumerate(rows.values()):
            vals = [v[key] for v in runs.values() if v.get(key) is not None]
            if vals:
                ax.bar(i, statistics.fmean(vals), color="C0" if i else "gray", alpha=0.5)
                ax.plot([i] * len(vals), vals, "k.")
        ax.set_xticks(range(len(rows)), [n.replace(" (oracle traces)", "").replace("anchored_residual", "AR")
                                         for n in rows], rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdlab compare-privileged", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.6, 0.8, 1.2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="which methods to run (put key=value overrides before this option)")
    p.add_argument("--student", help="student directory (default: the cached built-in student)")
    p.add_argument("--teacher", help="an already warm-started privileged teacher (default: OUT/privileged_teacher)")
    p.add_argument("--base-teacher", help="the teacher the privileged one is made from (default: built-in)")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--config", help="the training config (default: the demo's, opdlab/configs/demo.yaml)")
    p.add_argument("--out", default="runs/privileged")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
