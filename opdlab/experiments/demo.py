"""`opdlab demo`: the whole method on a laptop, in minutes, with no network.

1. Prepare the pair's teacher and student (`opdlab.experiments.pairs`; by default tiny Llama models trained from
   scratch by `opdlab sft` on the built-in task's worked solutions, with `--pair smollm2` a real pretrained LM and
   its pruned copy), cached under $OPDLAB_CACHE (default ~/.cache/opdlab) so a second run skips this.
2. Evaluate the teacher and the student on held-out problems (mean@k, pass@k).
3. Distil: `train()` with the pair's config (`opdlab/configs/demo.yaml`, `demo_smollm2.yaml`: sampled-token OPD).
4. Evaluate the distilled student and print teacher / student before / student after side by side.

The run directory gets the resolved config, metrics.jsonl, TensorBoard events, checkpoints, sample rollouts,
eval JSONs and PNGs of the training curves and of accuracy by response length.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from opdlab.checkpoint import latest_checkpoint
from opdlab.config import ModelConfig, RunConfig
from opdlab.evaluate import comparison_table, evaluate_model
from opdlab.experiments.pairs import get_pair, prepare_pair
from opdlab.report import plot_eval_by_length, plot_training_curves
from opdlab.run import load_run_config
from opdlab.runtime import resolve_device, resolve_precision, set_threads
from opdlab.tasks import make_task
from opdlab.train import TrainingError, train


def demo_config_path(pair: str = "builtin") -> Path:
    return get_pair(pair).config_path()


def run_demo(run_dir: str, overrides: list[str] | None = None, console: Console | None = None,
             pair: str = "builtin", force: bool = False) -> dict:
    """Run the demo into `run_dir`; a finished run already there is refused unless `force` (then it is replaced)."""
    console = console or Console()
    overrides = list(overrides or [])
    if not any(o.startswith("run_dir=") for o in overrides):  # an explicit run_dir=... wins over --run-dir
        overrides.append(f"run_dir={run_dir}")
    cfg: RunConfig = load_run_config(demo_config_path(pair), overrides)
    out = Path(cfg.run_dir)
    ckpt = latest_checkpoint(out / "checkpoints")
    resume = ckpt is not None and int(ckpt.name.split("-")[1]) < cfg.train.steps
    if ckpt is not None and not resume:
        if not force:
            raise TrainingError(f"{out} already holds a finished run ({ckpt.name}); pick another --run-dir, or pass "
                                f"--force to replace it")
        console.print(f"{out} holds a finished demo run: replacing it (--force)")
        shutil.rmtree(out)
    set_threads(cfg.train.threads)  # the demo's config pins it: its numbers do not depend on the core count
    prepare_pair(pair, console=console)
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
    title = f"{get_pair(pair).about}, {cfg.eval.num_problems} held-out problems"
    console.print(comparison_table(results, title=title))
    before, after = results["student before"].mean_at_k, results["student after"].mean_at_k
    console.print(f"student mean@{cfg.eval.k}: {before:.1%} -> {after:.1%} ({after - before:+.1%}); "
                  f"run dir {out} (curves: {curves.name}, {by_length.name})")
    return results
