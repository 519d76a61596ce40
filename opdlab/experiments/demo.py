"""`opdlab demo`: the whole method on a laptop, in minutes, with no network.

1. Prepare the built-in task's teacher and student: tiny Llama models trained from scratch by `opdlab sft` on
   the task's worked solutions (the teacher bigger and longer), cached under $OPDLAB_CACHE (default
   ~/.cache/opdlab) so a second run skips this.
2. Evaluate the teacher and the student on held-out problems (mean@k, pass@k).
3. Distil: `train()` with the config in `opdlab/configs/demo.yaml` (sampled-token reverse-KL OPD).
4. Evaluate the distilled student and print teacher / student before / student after side by side.

The run directory gets the resolved config, metrics.jsonl, TensorBoard events, checkpoints, sample rollouts,
eval JSONs and PNGs of the training curves and of accuracy by response length.
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console

from opdlab.checkpoint import latest_checkpoint
from opdlab.config import ModelConfig, RunConfig, TaskConfig
from opdlab.evaluate import comparison_table, evaluate_model
from opdlab.models.loading import builtin_dir
from opdlab.report import plot_eval_by_length, plot_training_curves
from opdlab.run import load_run_config
from opdlab.runtime import resolve_device, resolve_precision
from opdlab.sft import SFTConfig, run_sft
from opdlab.tasks import make_task
from opdlab.train import train

# The built-in task the demo models are made for; also the demo's training and evaluation task (configs/demo.yaml).
# Values stay in [0, 19]: with 99 the warm start had ~1,800 addition/subtraction facts to learn instead of ~350, and
# after 500 SFT steps a model solved 11 % of problems (greedy) against 47 % with max_value 19.
BUILTIN_TASK = dict(name="arithmetic", seed=0, arithmetic=dict(min_steps=2, max_steps=3, max_value=19))
# Warm-start recipes. The student is smaller (0.38M parameters against 0.88M) and trained on the same 2-3 step chains,
# but half of its warm-start targets are a shortcut (`task.arithmetic.shortcut_frac`): no working, and the question's
# first number as the answer. So it has learnt the chains and a habit the teacher lacks: on about half of its rollouts
# it skips the working and answers wrongly. The teacher gives that first "A" token almost no probability, and its
# token-level feedback on the student's own rollouts removes the habit in a few dozen steps; what OPD does not
# improve here in 60 steps is the arithmetic inside the chains (docs/results/builtin-opd.md).
# Both recipes pin fp32: at these sizes (hidden 64-128) bf16 autocast costs more than it saves (the demo's OPD step
# ran at 3.6k tokens/s in bf16-mixed against 4.6k in fp32), and the cached models stay those the demo was measured on.
# The student's schedule ends at 0.1x its peak learning rate: a warm start that decays to zero leaves a tiny model
# that any later fine-tuning at 1e-4 first knocks back.
RECIPES = {
    "teacher": dict(init="teacher", steps=2000, batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.0, seed=0,
                    precision="fp32"),
    "student": dict(init="student", steps=1400, batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.0, seed=1,
                    min_lr_ratio=0.1, shortcut_frac=0.5, precision="fp32"),
}


def demo_config_path() -> Path:
    return Path(str(resources.files("opdlab") / "configs" / "demo.yaml"))


def _sft_config(name: str):
    recipe = dict(RECIPES[name])
    arithmetic = {**BUILTIN_TASK["arithmetic"], "shortcut_frac": recipe.pop("shortcut_frac", 0.0)}
    task = TaskConfig(**{**BUILTIN_TASK, "arithmetic": arithmetic})
    return SFTConfig(task=task, output_dir=str(builtin_dir(name)), **recipe)


def is_prepared(name: str) -> bool:
    """True when the cached built-in model was made by the current recipe."""
    saved = builtin_dir(name) / "sft_config.yaml"
    if not saved.is_file():
        return False

    want = _sft_config(name).model_dump(mode="json")
    try:  # through the model, so a field added since (with its default) does not invalidate the cache
        have = SFTConfig(**yaml.safe_load(saved.read_text())).model_dump(mode="json")
    except (TypeError, ValueError):
        return False
    where = ("device", "output_dir")  # a moved cache ($OPDLAB_CACHE) or another device is the same recipe
    return {k: v for k, v in have.items() if k not in where} == {k: v for k, v in want.items() if k not in where}


def prepare_builtin(force: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    for name in ("teacher", "student"):
        if is_prepared(name) and not force:
            console.print(f"built-in {name}: cached at {builtin_dir(name)}")
            continue
        console.print(f"built-in {name}: warm-starting from scratch ({RECIPES[name]['steps']} SFT steps)")
        run_sft(_sft_config(name))


def run_demo(run_dir: str, overrides: list[str] | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    prepare_builtin(console=console)
    cfg: RunConfig = load_run_config(demo_config_path(), [*(overrides or []), f"run_dir={run_dir}"])
    out = Path(cfg.run_dir)
    ckpt = latest_checkpoint(out / "checkpoints")
    resume = ckpt is not None and int(ckpt.name.split("-")[1]) < cfg.train.steps
    if ckpt is not None and not resume:
        console.print(f"{out} holds a finished demo run: replacing it")
        shutil.rmtree(out)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.train.precision, device)
    task = make_task(cfg.task)

    results = {}
    for label, model_cfg in (("teacher", cfg.teacher), ("student before", cfg.student)):
        console.print(f"evaluating {label} ({model_cfg.path})")
        results[label] = evaluate_model(model_cfg, task, cfg.eval, device=device, precision=precision,
                                        seed=cfg.train.seed)

    console.print(f"{'resuming' if resume else 'running'} on-policy distillation: {cfg.train.steps} steps, "
                  f"objective {cfg.objective.name}, run dir {out}")
    train(cfg, resume=resume)

    final = latest_checkpoint(out / "checkpoints") / "model"
    console.print("evaluating student after")
    results["student after"] = evaluate_model(ModelConfig(path=str(final)), task, cfg.eval, device=device,
                                              precision=precision, seed=cfg.train.seed)

    for label, res in results.items():
        res.save(out / f"eval_{label.replace(' ', '_')}.json")
    curves = plot_training_curves(out)
    by_length = plot_eval_by_length(results, out / "eval_by_length.png")
    console.print(comparison_table(results, title=f"built-in task, {cfg.eval.num_problems} held-out problems"))
    before, after = results["student before"].mean_at_k, results["student after"].mean_at_k
    console.print(f"student mean@{cfg.eval.k}: {before:.1%} -> {after:.1%} ({after - before:+.1%}); "
                  f"run dir {out} (curves: {curves.name}, {by_length.name})")
    return results
