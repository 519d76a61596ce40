"""LoRA students (`student.lora`, `opdlab.models.lora`): only the adapters train and are checkpointed, a run resumes
exactly, `opdlab export` merges them into a plain model, the adapters-disabled base is a teacher equal to a frozen
copy, and every objective family trains with them.

    python -m pytest tests/test_lora.py -q
"""
from __future__ import annotations

import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opdlab.config import ModelConfig, StudentConfig
from opdlab.models.loading import load_model
from opdlab.models.lora import AdaptersDisabled, load_adapter_weights
from opdlab.rollout.builtin import sample
from opdlab.tasks import ArithmeticTask
from opdlab.teacher.scoring import score
from opdlab.train import train
from test_privileged import PRIV
from test_train import (SUBPROCESS_TIMEOUT, init_weights, make_cfg, metric_rows, opdlab_command, subprocess_env)

LORA = ["student.lora.r=4", "student.lora.alpha=8"]
CPU = torch.device("cpu")


def adapters(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "model" / "adapter_model.safetensors")


def trainer_state(run_dir, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt", weights_only=False)


def test_only_the_adapters_train_and_are_checkpointed(model_dirs, tmp_path):
    run = tmp_path / "lora"
    train(make_cfg(model_dirs, run, *LORA, "train.steps=2"), progress=False)
    model_dir = run / "checkpoints" / "step-000002" / "model"
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "model.safetensors").exists()
    saved = adapters(run, 2)
    n_layers_adapted = 7  # q, k, v, o, gate, up, down of the one decoder layer ('all-linear' leaves lm_head out)
    assert len(saved) == 2 * n_layers_adapted and all("lora_" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it moved
    # the optimizer holds state for the adapters alone
    opt = trainer_state(run, 2)["optimizer"]
    assert len(opt["state"]) == len(saved)
    assert all("lora_" in name for name in opt["state"])


def test_merged_checkpoint_is_base_plus_scaled_low_rank_update(model_dirs, tmp_path):
    """The checkpoint loader merges W + (alpha / r) B A into every adapted weight: checked against that formula
    computed here from the base file and the saved adapters, on every adapted matrix."""
    run = tmp_path / "lora"
    train(make_cfg(model_dirs, run, *LORA, "train.steps=2"), progress=False)
    merged, _ = load_model(ModelConfig(path=str(run / "checkpoints" / "step-000002" / "model")), CPU)
    merged_state, base, saved = merged.state_dict(), init_weights(model_dirs), adapters(run, 2)
    checked = 0
    for key in saved:
        if "lora_A" not in key:
            continue
        target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        a, b = saved[key], saved[key.replace("lora_A", "lora_B")]
        expected = base[target] + (8 / 4) * b @ a
        torch.testing.assert_close(merged_state[target], expected, rtol=0, atol=1e-6)
        assert (expected - base[target]).abs().max() > 0
        checked += 1
    assert checked == 7
    untouched = [k for k in base if "layers" not in k]  # embeddings, final norm, output layer
    for k in untouched:
        torch.testing.assert_close(merged_state[k], base[k], rtol=0, atol=0)


def test_lora_run_resumes_exactly(model_dirs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_cfg(model_dirs, a, *LORA), progress=False)
    train(make_cfg(model_dirs, b, *LORA, "train.steps=2"), progress=False)
    train(make_cfg(model_dirs, b, *LORA), resume=True, progress=False)
    wa, wb = adapters(a, 4), adapters(b, 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["train/loss"] for r in metric_rows(a)] == [r["train/loss"] for r in metric_rows(b)]


def test_export_writes_a_plain_model_that_from_pretrained_loads(model_dirs, tmp_path):
    run, out = tmp_path / "lora", tmp_path / "exported"
    train(make_cfg(model_dirs, run, *LORA, "train.steps=2"), progress=False)
    proc = subprocess.run([*opdlab_command(), "export", str(run), "--out", str(out)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)
    merged, _ = load_model(ModelConfig(path=str(run / "checkpoints" / "step-000002" / "model")), CPU)
    ids = torch.randint(0, 90, (2, 7))
    torch.testing.assert_close(plain(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    again = subprocess.run([*opdlab_command(), "export", str(run), "--out", str(out)], env=subprocess_env(),
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_adapters_disabled_base_scores_as_a_frozen_copy(model_dirs, tmp_path, tokenizer):
    """After LoRA training the student's adapters-disabled base scores rollouts exactly as the untouched base
    model does, while the adapted student scores them differently."""
    run = tmp_path / "lora"
    train(make_cfg(model_dirs, run, *LORA, "train.steps=2"), progress=False)
    student, tok = load_model(StudentConfig(path=str(model_dirs["student"]), lora={"r": 4, "alpha": 8}), CPU,
                              trainable=True)
    load_adapter_weights(student, run / "checkpoints" / "step-000002" / "model")
    base, _ = load_model(ModelConfig(path=str(model_dirs["student"])), CPU)
    problems = list(ArithmeticTask(1, 2, seed=0, test_size=8).problems("train"))[:3]
    rollouts = sample(base, tok, problems, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    V = len(tok)
    disabled, frozen, adapted = (score(m, rollouts, V, top_k=3) for m in (AdaptersDisabled(student), base, student))
    torch.testing.assert_close(disabled.logp_B_T, frozen.logp_B_T, rtol=0, atol=1e-6)
    torch.testing.assert_close(disabled.entropy_B_T, frozen.entropy_B_T, rtol=0, atol=1e-6)
    assert (adapted.logp_B_T - frozen.logp_B_T).abs().max() > 1e-4
    # sampling through the wrapper is the base's sampling
    again = sample(AdaptersDisabled(student), tok, problems, max_new_tokens=8,
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids_B_T, rollouts.completion_ids_B_T)


def test_lora_base_teacher_trains_as_the_frozen_student_teacher(model_dirs, tmp_path):
    """privileged.teacher=lora_base against frozen_student (a copy of the initial LoRA student, whose adapters
    start at zero): the same teacher, so the same adapters after 2 steps of privileged OPD."""
    runs = {}
    for teacher in ("lora_base", "frozen_student"):
        runs[teacher] = tmp_path / teacher
        train(make_cfg(model_dirs, runs[teacher], *LORA, *PRIV, "objective.name=privileged_partial",
                       f"privileged.teacher={teacher}", "train.steps=2"), progress=False)
    a, b = adapters(runs["lora_base"], 2), adapters(runs["frozen_student"], 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective, extra", [
    ("opd", []), ("reverse_kl", []), ("lsm", ["objective.support_k=4"]),
    ("lookahead", ["objective.lookahead.tau=1.0", "objective.lookahead.k=4", "objective.support_k=4"]),
    ("anchored_residual", [*PRIV, "privileged.teacher=lora_base"]),
])
def test_every_objective_family_trains_a_lora_student(objective, extra, model_dirs, tmp_path):
    run = tmp_path / objective
    train(make_cfg(model_dirs, run, *LORA, f"objective.name={objective}", "train.steps=2", *extra), progress=False)
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in rows)
    assert any(v.abs().max() > 0 for k, v in adapters(run, 2).items() if "lora_B" in k)


def test_bf16_base_with_fp32_adapters_under_bf16_mixed(model_dirs, tmp_path):
    """dtype auto under bf16-mixed: the frozen base is stored in bf16, the adapters in fp32, and a small lr moves
    every element of every adapter matrix."""
    student, _ = load_model(StudentConfig(path=str(model_dirs["student"]), lora={"r": 4}), CPU, trainable=True,
                            precision="bf16-mixed")
    dtypes = {p.dtype for n, p in student.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for n, p in student.named_parameters() if "lora_" in n} == {torch.float32}
    run = tmp_path / "mixed"
    train(make_cfg(model_dirs, run, *LORA, "train.precision=bf16-mixed", "train.lr=1e-6", "train.steps=3",
                   "train.save_every=3"), progress=False)
    step1 = tmp_path / "step1"
    train(make_cfg(model_dirs, step1, *LORA, "train.precision=bf16-mixed", "train.lr=1e-6", "train.steps=1"),
          progress=False)
    first, last = adapters(step1, 1), adapters(run, 3)
    for k in first:
        if "lora_A" in k:  # B is 0 before the first step; A moves from step 2 on, when B is no longer 0
            assert (first[k] != last[k]).float().mean() >= 0.99, k
