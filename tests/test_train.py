"""Tests of the training loop (`opdlab.train`), checkpoints and the `opdlab train` command, on the tiny models of
conftest.py and the built-in arithmetic task.

    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import opdlab.objectives
from opdlab import cli
from opdlab.config import load_config
from opdlab.models.loading import build_char_tokenizer
from opdlab.models.prompts import encode_prompts, render_prompt
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.train import TrainingError, train
from opdlab.types import ObjectiveOutput

SUBPROCESS_TIMEOUT = 180


def overrides(model_dirs, run_dir, *extra) -> list[str]:
    return [f"student.path={model_dirs['student']}", f"teacher.path={model_dirs['teacher']}", "device=cpu",
            "task.arithmetic.min_steps=1", "task.arithmetic.max_steps=2", "task.test_size=8",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "train.steps=4", "train.save_every=2",
            "train.sample_every=100", "train.lr=1e-3", "scoring.chunk_size=5", "train.precision=fp32",
            f"run_dir={run_dir}", *extra]


def make_cfg(model_dirs, run_dir, *extra):
    return load_config(None, overrides(model_dirs, run_dir, *extra))


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors")


def init_weights(model_dirs) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dirs["student"]) / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    # one thread, like the in-process runs, so the subprocess computes bit-for-bit the same numbers
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def opdlab_command() -> list[str]:
    exe = Path(sys.executable).parent / "opdlab"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "opdlab.cli"]


# ---------------------------------------------------------------- resume


def test_resume_equals_uninterrupted_run(model_dirs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_cfg(model_dirs, a), progress=False)
    train(make_cfg(model_dirs, b, "train.steps=2"), progress=False)
    assert not (b / "checkpoints" / "step-000004").exists()
    train(make_cfg(model_dirs, b), resume=True, progress=False)

    final_a = weights(a, 4)
    assert_same_weights(weights(b, 4), final_a)
    assert max_diff(final_a, weights(a, 2)) > 1e-4 and max_diff(weights(a, 2), init_weights(model_dirs)) > 1e-4
    assert [r["step"] for r in metric_rows(b)] == [1, 2, 3, 4]
    # the resumed run's numbers are the uninterrupted run's numbers
    for ra, rb in zip(metric_rows(a), metric_rows(b)):
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], abs=1e-6)
        assert ra["train/reward"] == rb["train/reward"]
    state_a = torch.load(a / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    state_b = torch.load(b / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert state_a["data_position"] == state_b["data_position"] == 4 * 2
    assert torch.equal(state_a["rng"]["sampler"], state_b["rng"]["sampler"])


def test_fused_optimizer_steps_as_the_default_one_and_resumes_exactly(model_dirs, tmp_path):
    """`train.fused_optimizer`: the first update equals the default AdamW's up to rounding (the rollouts before it
    are the same), the checkpoint's optimizer is the fused one, and an interrupted fused run resumes to the same
    weights bit for bit."""
    plain, fused, resumed = tmp_path / "plain", tmp_path / "fused", tmp_path / "resumed"
    train(make_cfg(model_dirs, plain, "train.save_every=1", "train.keep_checkpoints=4"), progress=False)
    train(make_cfg(model_dirs, fused, "train.save_every=1", "train.keep_checkpoints=4",
                   "train.fused_optimizer=true"), progress=False)
    assert max_diff(weights(plain, 1), init_weights(model_dirs)) > 1e-4
    assert_same_weights(weights(fused, 1), weights(plain, 1), atol=1e-6)
    state = torch.load(fused / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    train(make_cfg(model_dirs, resumed, "train.steps=2", "train.fused_optimizer=true"), progress=False)
    train(make_cfg(model_dirs, resumed, "train.fused_optimizer=true"), resume=True, progress=False)
    assert_same_weights(weights(resumed, 4), weights(fused, 4), atol=0)


def test_refuses_to_overwrite_or_resume_nothing(model_dirs, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(model_dirs, run, "train.steps=1"), progress=False)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(make_cfg(model_dirs, run, "train.steps=2"), progress=False)
    assert (run / "config.yaml").read_text() == saved  # nothing of the old run was touched
    assert [r["step"] for r in metric_rows(run)] == [1]
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(make_cfg(model_dirs, tmp_path / "fresh"), resume=True, progress=False)


def test_killed_process_resumes_to_the_same_weights(model_dirs, tmp_path):
    run = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    # many steps, a checkpoint each: the process is killed long before it could finish
    config.write_text(yaml.safe_dump(load_config(None, overrides(
        model_dirs, run, "train.steps=100000", "train.save_every=1")).model_dump(mode="json")))
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([*opdlab_command(), "train", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=subprocess_env(), start_new_session=True)
    latest = run / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while True:
            if latest.is_file() and latest.read_text().strip() >= "step-000002":
                break
            assert proc.poll() is None, f"training process exited early:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, "no second checkpoint before the timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    done = int(latest.read_text().strip().removeprefix("step-"))
    total = done + 2
    train(make_cfg(model_dirs, run, f"train.steps={total}", "train.save_every=1"), resume=True, progress=False)
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, f"train.steps={total}"), progress=False)
    assert_same_weights(weights(run, total), weights(reference, total))
    assert [r["step"] for r in metric_rows(run)] == list(range(1, total + 1))


# ---------------------------------------------------------------- non-finite losses


def nan_on_calls(monkeypatch, bad_calls):
    """Replace the 'opd' table entry by a wrapper whose loss is NaN on the given (1-based) calls."""
    real = opdlab.objectives.OBJECTIVES["opd"]
    calls = []

    def wrapper(rollouts, student, teacher, cfg):
        calls.append(1)
        out = real(rollouts, student, teacher, cfg)
        if bad_calls == "all" or len(calls) in bad_calls:
            return ObjectiveOutput(loss=out.loss * float("nan"), metrics=out.metrics)
        return out

    monkeypatch.setitem(opdlab.objectives.OBJECTIVES, "opd", wrapper)
    return calls


def test_nan_step_is_skipped(model_dirs, tmp_path, monkeypatch):
    calls = nan_on_calls(monkeypatch, {2})
    run = tmp_path / "nan"
    train(make_cfg(model_dirs, run, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=5"),
          progress=False)
    assert len(calls) == 3
    w1, w2, w3 = (weights(run, s) for s in (1, 2, 3))
    assert max_diff(w1, init_weights(model_dirs)) > 1e-5  # step 1 did update
    assert_same_weights(w2, w1, atol=0)  # the NaN step changed nothing
    assert max_diff(w3, w2) > 1e-5  # and training went on
    assert all(torch.isfinite(v).all() for v in w3.values())
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 0.0]
    # the optimizer state was not touched by the NaN step: Adam has taken 2 steps, not 3
    state = torch.load(run / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert state["bad_steps"] == 0
    assert all(s["step"].item() == 2 for s in state["optimizer"]["state"].values())


def test_repeated_nan_stops_with_weights_untouched(model_dirs, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, "all")
    run = tmp_path / "allnan"
    with pytest.raises(TrainingError, match="2 bad steps in a row"):
        train(make_cfg(model_dirs, run, "train.steps=5", "train.save_every=1", "train.max_bad_steps=2"),
              progress=False)
    assert_same_weights(weights(run, 1), init_weights(model_dirs), atol=0)
    assert not (run / "checkpoints" / "step-000002").exists()


# ---------------------------------------------------------------- the objective trains


def on_policy_reverse_kl(student_dir, teacher_dir, tokenizer) -> float:
    """Mean per-token KL(student || teacher) over the vocabulary, from full logits, on completions the student
    samples (fixed seed) for fixed test prompts: the quantity sampled-token OPD minimises."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    task = ArithmeticTask(1, 2, seed=0, test_size=8)
    prompts = [render_prompt(tokenizer, task.problems("test")[i].question) for i in range(8)] * 4
    p_ids, p_mask = encode_prompts(tokenizer, prompts)
    g = torch.Generator().manual_seed(0)
    ids, mask = p_ids, p_mask
    with torch.no_grad():  # plain ancestral sampling, no cache: 16 tokens
        for _ in range(16):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = student(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            tok = torch.multinomial(logits.double().softmax(-1), 1, generator=g)
            ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        P = p_ids.shape[1]
        ls, lt = (F.log_softmax(m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:-1].double(),
                                dim=-1) for m in (student, teacher))
    return (ls.exp() * (ls - lt)).sum(-1).mean().item()


def test_opd_reduces_reverse_kl_to_teacher(model_dirs, tmp_path, tokenizer):
    run = tmp_path / "learn"
    train(make_cfg(model_dirs, run, "train.steps=20", "train.save_every=100", "train.lr=1e-2",
                   "rollout.prompts_per_step=8", "rollout.samples_per_prompt=1", "rollout.max_new_tokens=16"),
          progress=False)
    before = on_policy_reverse_kl(model_dirs["student"], model_dirs["teacher"], tokenizer)
    after = on_policy_reverse_kl(run / "checkpoints" / "step-000020" / "model", model_dirs["teacher"], tokenizer)
    assert before > 0.3
    assert after < 0.8 * before, (before, after)
    rows = metric_rows(run)
    assert sum(r["train/reverse_kl"] for r in rows[-5:]) < sum(r["train/reverse_kl"] for r in rows[:5])


# ---------------------------------------------------------------- the command


def test_cli_train_end_to_end(model_dirs, tmp_path):
    run = tmp_path / "cli_run"
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"path": str(model_dirs["student"])}, "teacher": {"path": str(model_dirs["teacher"])},
        "task": {"name": "arithmetic", "arithmetic": {"min_steps": 1, "max_steps": 2}, "test_size": 8},
        "rollout": {"prompts_per_step": 2, "max_new_tokens": 8}, "device": "cpu"}))
    proc = subprocess.run(
        [*opdlab_command(), "train", str(config), "train.steps=3", "train.save_every=2", "train.sample_every=2",
         f"run_dir={run}"], env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(run / "config.yaml").train.steps == 3
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/loss", "train/reverse_kl", "teacher/entropy", "student/entropy", "perf/tokens_per_s",
                "train/grad_norm", "train/lr"):
        assert all(key in r and r[key] == r[key] for r in rows), key  # present and not NaN
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000002", "step-000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    model_dir = run / "checkpoints" / "step-000003" / "model"
    assert (model_dir / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)  # an ordinary HF model directory
    assert reloaded.config.vocab_size == len(build_char_tokenizer())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["step"] for s in samples} == {1, 2} and all("response" in s for s in samples)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("override, field", [("train.lrr=1", "train.lrr"), ("train.lr=fast", "train.lr")])
def test_cli_bad_override_exits_2(override, field, capsys, tmp_path):
    # `opdlab` is `sys.exit(main())`: main's return value is the exit status
    assert cli.main(["train", "-", override, f"run_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err
    assert field in err and "opdlab:" in err
    assert not (tmp_path / "never").exists()


def test_cli_train_without_a_config_says_what_to_give(capsys):
    assert cli.main(["train"]) == 2
    assert "train: a config is required: a YAML file" in capsys.readouterr().err
    assert cli.main(["train", "train.lr=1"]) == 2
    assert "got the override 'train.lr=1': write `opdlab train - train.lr=1 ...`" in capsys.readouterr().err


def test_cli_bad_override_is_reported_as_the_override(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train: {lr: -1}\n")
    assert cli.main(["train", str(config), "student.dtype=fp32", f"run_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration ({config} + overrides):" in err
    assert "student.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp32'), from override " \
           "'student.dtype=fp32'" in err
    assert "train.lr: Input should be greater than 0 (got -1)\n" in err  # from the file: no override named
    assert cli.main(["train", "-", "train.lr=-2"]) == 2
    assert "invalid configuration (defaults + overrides):\n  train.lr: Input should be greater than 0 (got -2), " \
           "from override 'train.lr=-2'" in capsys.readouterr().err


def test_cli_turns_off_transformers_progress_bars():
    from transformers.utils import logging as transformers_logging
    transformers_logging.enable_progress_bar()
    try:
        assert cli.main(["objectives"]) == 0
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_schedule_with_a_floor(schedule):
    from opdlab.config import TrainConfig
    from opdlab.runtime import make_scheduler

    cfg = TrainConfig(steps=110, warmup_steps=10, schedule=schedule, lr=1e-3, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up to the peak
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # then never rising
    midway = 0.55e-3  # half-way through the decay both schedules sit at floor + (peak - floor) / 2
    assert lrs[60] == pytest.approx(midway, rel=1e-6)
    assert lrs[-1] >= 1e-4 - 1e-12 and lrs[-1] < 1.1e-4  # ends at the floor, not at zero
