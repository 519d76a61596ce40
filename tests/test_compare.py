"""`opdlab compare` on the tiny test models: every (objective, seed) run is a real `train()` run, and the table's
"after" figure is the held-out mean@k of the run's final checkpoint, re-evaluated here independently."""
from __future__ import annotations

import json

from opdlab.experiments.compare import run_compare
from opdlab.config import EvalConfig, ModelConfig, TaskConfig
from opdlab.evaluate import evaluate
from opdlab.models.loading import load_model
from opdlab.tasks import make_task


def test_compare_runs_each_objective_and_reports_final_accuracy(model_dirs, tmp_path):
    overrides = [f"student.path={model_dirs['student']}", f"teacher.path={model_dirs['teacher']}",
                 "task.arithmetic.min_steps=1", "task.arithmetic.max_steps=1", "rollout.prompts_per_step=2",
                 "rollout.max_new_tokens=8",
                 "train.steps=2", "train.save_every=2", "eval.num_problems=3", "eval.k=2", "eval.max_new_tokens=8",
                 "device=cpu"]
    results = run_compare(["opd", "lsm"], [0, 1], overrides, tmp_path)

    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["runs"]) == {"opd", "lsm"} and set(saved["runs"]["lsm"]) == {"0", "1"}
    assert (tmp_path / "compare.png").stat().st_size > 0
    cfg_lsm = json.loads(json.dumps(saved["runs"]["lsm"]["1"]))
    assert cfg_lsm["loss"][0] == [1, 2] and len(cfg_lsm["mean_at_k"][1]) >= 1

    final = tmp_path / "lsm" / "seed-1" / "checkpoints" / "step-000002" / "model"
    model, tok = load_model(ModelConfig(path=str(final)))
    task = make_task(TaskConfig(arithmetic={"min_steps": 1, "max_steps": 1}))
    again = evaluate(model, tok, task, EvalConfig(num_problems=3, k=2, max_new_tokens=8), seed=1, progress=False)
    assert results["runs"]["lsm"][1]["after"] == again.mean_at_k
    # the by-length table reads the same final evaluation, bucket by bucket
    assert results["runs"]["lsm"][1]["after_by_length"] == {
        b.label: b.mean_reward for b in again.buckets if b.mean_reward is not None}


def test_cli_compare_takes_options_first_and_reports_config_errors(capsys):
    from opdlab.cli import main

    # options before the overrides reach compare's own parser; a bad override fails before any model is touched
    assert main(["compare", "--objectives", "opd", "--seeds", "1", "objective.name=bogus"]) == 2
    err = capsys.readouterr().err
    assert "objective.name" in err and "bogus" in err and "allowed" in err


def test_cli_compare_overrides_after_the_objective_list_are_overrides(capsys):
    from opdlab.cli import main

    # `--objectives opd train.lr=oops` must read train.lr=oops as an override (and reject its value), not as a name
    assert main(["compare", "--seeds", "1", "--objectives", "opd", "train.lr=oops"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "oops" in err and "unknown objective" not in err
