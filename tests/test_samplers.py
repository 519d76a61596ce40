"""The rollout-backend interface (`opdlab.rollout.samplers`) with the built-in backend, the vLLM backend's packing of
its outputs (`opdlab.rollout.vllm.pack_outputs`) and its import guard (vLLM is not installed here).

    python -m pytest tests/test_samplers.py -q
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import opdlab.rollout.builtin
from opdlab.config import ConfigError, RolloutConfig, load_config
from opdlab.distributed import row_generators
from opdlab.models.logprobs import student_forward
from opdlab.rollout.builtin import sample
from opdlab.rollout.packed import packed_linears, packing_supported, use_packing
from opdlab.rollout.vllm import VLLMSampler, pack_outputs
from opdlab.rollout.samplers import BuiltinSampler, make_sampler
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.train import train
from test_train import make_cfg

PROBLEMS = ArithmeticTask(seed=2, min_steps=1, max_steps=2).problems("train")[:5]


def test_builtin_sampler_returns_the_samplers_log_probs(student_model, tokenizer):
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    sampler = make_sampler(cfg, student_model, tokenizer, len(tokenizer), "unused")
    assert isinstance(sampler, BuiltinSampler)
    rollouts = sampler.sample(PROBLEMS, seeds=[11, 12, 13, 14, 15])
    mask_B_T = rollouts.completion_mask_B_T.bool()
    # log pi_old of the sampled tokens = the student's log-probs recomputed by a separate forward pass
    recomputed_B_T = student_forward(student_model, rollouts, len(tokenizer)).logp_B_T.detach()
    torch.testing.assert_close(rollouts.logp_old_B_T[mask_B_T], recomputed_B_T[mask_B_T], rtol=0, atol=1e-5)
    # the same seeds draw the same rows, in any order and batch; other seeds draw others
    again = sampler.sample(PROBLEMS[::-1], seeds=[15, 14, 13, 12, 11])
    assert again.texts == rollouts.texts[::-1]
    other = sampler.sample(PROBLEMS, seeds=[21, 22, 23, 24, 25])
    assert other.texts != rollouts.texts
    sampler.push_weights(student_model)  # nothing to push: it samples with the model itself


def test_static_and_dynamic_kv_caches_sample_the_same_rollouts(student_model, tokenizer, monkeypatch):
    """The static cache (the default) against the model's own growing cache, in fp32: left-padded prompts of
    different lengths, rows that stop early, top-p and greedy decoding; the same tokens and log-probs."""
    problems = ArithmeticTask(seed=3, min_steps=1, max_steps=4).problems("train")[:6]
    prompt_lengths = {len(tokenizer(p.question)["input_ids"]) for p in problems}
    assert len(prompt_lengths) > 1  # so the prompts are left-padded
    first = BuiltinSampler(student_model, tokenizer, RolloutConfig(max_new_tokens=8), len(tokenizer)).sample(
        problems, seeds=[1, 2, 3, 4, 5, 6])
    # the untrained model never samples EOS: stop instead on a token row 0 samples, so rows end at different steps
    stop = int(first.completion_ids_B_T[0, 5])
    monkeypatch.setattr(opdlab.rollout.builtin, "stop_token_ids", lambda model, tok: [stop])
    for temperature, top_p in ((1.0, 1.0), (0.8, 0.9), (0.0, 1.0)):
        out = {}
        for kv_cache in ("static", "dynamic"):
            out[kv_cache] = sample(student_model, tokenizer, problems, max_new_tokens=40, temperature=temperature,
                                   top_p=top_p, generator=row_generators([1, 2, 3, 4, 5, 6], torch.device("cpu")),
                                   kv_cache=kv_cache, decoder="hf")
        static, dynamic = out["static"], out["dynamic"]
        assert torch.equal(static.completion_ids_B_T, dynamic.completion_ids_B_T)
        assert torch.equal(static.completion_mask_B_T, dynamic.completion_mask_B_T)
        if temperature == 1.0:  # row 0 stops at step 6; not every row does
            lengths = static.completion_mask_B_T.sum(1)
            assert lengths[0] <= 6 and lengths.max() > 6
        torch.testing.assert_close(static.logp_old_B_T, dynamic.logp_old_B_T, rtol=0, atol=1e-5)
        torch.testing.assert_close(static.sampler_logp_B_T, dynamic.sampler_logp_B_T, rtol=0, atol=1e-5)


def test_pack_outputs_rebuilds_a_rollout_batch(student_model, tokenizer):
    """vLLM hands back, per request, the generated ids and their log-probs; packed, they are the same batch."""
    cfg = RolloutConfig(max_new_tokens=10)
    rollouts = BuiltinSampler(student_model, tokenizer, cfg, len(tokenizer)).sample(PROBLEMS, [1, 2, 3, 4, 5])
    lengths = rollouts.completion_mask_B_T.sum(1).tolist()
    completions = [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids_B_T, lengths)]
    logps = [lp[:n].tolist() for lp, n in zip(rollouts.logp_old_B_T, lengths)]
    pad = tokenizer.pad_token_id
    packed = pack_outputs(rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P, completions, logps, PROBLEMS,
                          tokenizer, pad)
    assert packed.texts == rollouts.texts
    assert torch.equal(packed.completion_mask_B_T, rollouts.completion_mask_B_T)
    mask_B_T = rollouts.completion_mask_B_T.bool()
    assert torch.equal(packed.completion_ids_B_T[mask_B_T], rollouts.completion_ids_B_T[mask_B_T])
    assert (packed.completion_ids_B_T[~mask_B_T] == pad).all()
    torch.testing.assert_close(packed.logp_old_B_T, rollouts.logp_old_B_T, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="row 1 has 3 tokens but 2 log-probs"):
        pack_outputs(rollouts.prompt_ids_B_P[:2], rollouts.prompt_mask_B_P[:2], [[5], [5, 6, 7]],
                     [[-1.0], [-1.0, -2.0]], PROBLEMS[:2], tokenizer, pad)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_what_to_do(student_model, tokenizer, model_dirs, tmp_path):
    with pytest.raises(ImportError,
                       match=r"rollout.backend=vllm needs vLLM.*pip install vllm.*rollout.backend=builtin"):
        VLLMSampler(RolloutConfig(backend="vllm"), student_model, tokenizer, len(tokenizer), "unused")
    with pytest.raises(ImportError, match="needs vLLM"):
        train(make_cfg(model_dirs, tmp_path / "run", "rollout.backend=vllm"), progress=False)


def test_backend_is_validated():
    with pytest.raises(ConfigError, match=r"rollout.backend.*'builtin' or 'vllm'"):
        load_config(None, ["rollout.backend=sglang"])


@pytest.mark.skipif(not packing_supported(torch.device("cpu")), reason="oneDNN's bf16 linear needs AVX512 here")
def test_packed_linears_sample_what_autocast_samples(student_model, tokenizer):
    """Under bf16 autocast, decoding on weights prepacked for oneDNN (`rollout.packed_linears: auto`) against
    autocast's own casts ('off'): the same tokens, log-probs within bf16 rounding; the modules are put back."""
    problems = ArithmeticTask(seed=3, min_steps=1, max_steps=4).problems("train")[:6]
    out = {}
    for packed in ("auto", "off"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert use_packing(packed, torch.device("cpu")) == (packed == "auto")
            out[packed] = sample(student_model, tokenizer, problems, max_new_tokens=30, temperature=1.0,
                                 generator=row_generators([1, 2, 3, 4, 5, 6], torch.device("cpu")), packed=packed,
                                 decoder="hf")
    assert torch.equal(out["auto"].completion_ids_B_T, out["off"].completion_ids_B_T)
    torch.testing.assert_close(out["auto"].logp_old_B_T, out["off"].logp_old_B_T, rtol=0, atol=1e-2)
    assert not any("forward" in vars(m) for m in student_model.modules())
    assert not use_packing("auto", torch.device("cpu"))  # no autocast: fp32 products, nothing to pack


def test_packed_linears_compute_each_linear_and_restore_it_on_error():
    if not packing_supported(torch.device("cpu")):
        pytest.skip("oneDNN's bf16 linear needs AVX512 here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8, bias=False))
    x_B_1_D = torch.randn(3, 1, 40)
    with torch.no_grad():
        def bf16(t):  # as float64, after rounding to bf16
            return t.bfloat16().double()
        h = bf16(bf16(x_B_1_D) @ bf16(model[0].weight).T + bf16(model[0].bias))  # each product's bf16 output
        want = bf16(bf16(torch.nn.functional.silu(h)) @ bf16(model[2].weight).T).float()
        with pytest.raises(RuntimeError, match="inside"):
            with packed_linears(model, rows=3):
                got = model(x_B_1_D)
                raise RuntimeError("inside")
    assert got.dtype == torch.bfloat16 and got.shape == (3, 1, 8)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert not any("forward" in vars(m) for m in model.modules())


def test_packed_linears_refuse_a_bad_setting_and_leave_hooked_modules_alone(student_model, tokenizer):
    with pytest.raises(ValueError, match="packed_linears must be 'auto' or 'off', got 'on'"):
        sample(student_model, tokenizer, PROBLEMS[:1], max_new_tokens=2, packed="on")
    if not packing_supported(torch.device("cpu")):
        pytest.skip("oneDNN's bf16 linear needs AVX512 here")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    hook = model[0].forward  # an instance-level forward, as accelerate's hooks install
    model[0].forward = hook
    with packed_linears(model, rows=1):
        assert vars(model[0])["forward"] is hook and "forward" in vars(model[1])
    assert vars(model[0])["forward"] is hook and "forward" not in vars(model[1])
