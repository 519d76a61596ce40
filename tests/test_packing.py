"""Tests of `opdlab.models.packing`: rollouts packed several to a row give each token the hidden state it has in
the padded layout (checked against the padded forward), and packing computes fewer positions.

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AttentionInterface

from conftest import STUDENT_SIZE, tiny_llama
from opdlab.models.logprobs import final_hidden
from opdlab.models import packing
from opdlab.models.packing import first_fit, packed_final_hidden, segments_hidden


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_places_every_index_once_within_the_row(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 20))]
    row_len = max(lengths) + rng.randint(0, 30)
    bins = first_fit(lengths, row_len)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= row_len for b in bins)
    # first fit: no later row holds a sequence that would have fitted in the room an earlier row had left
    for j, b in enumerate(bins):
        for i in b:
            for earlier in bins[:j]:
                placed_before = [k for k in earlier if lengths[k] > lengths[i] or
                                 (lengths[k] == lengths[i] and k < i)]
                assert row_len - sum(lengths[k] for k in placed_before) < lengths[i]


def left_right_padded(tokenizer, prompt_lens, completion_lens, seed=0):
    """A (B, P+T) batch laid out as rollouts are: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    P, T = max(prompt_lens), max(completion_lens)
    ids = torch.full((len(prompt_lens), P + T), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, (p, t) in enumerate(zip(prompt_lens, completion_lens)):
        ids[b, P - p:P + t] = torch.randint(3, len(tokenizer), (p + t,), generator=g)
        mask[b, P - p:P + t] = 1
    return ids, mask


def test_packed_hidden_equals_padded_and_is_zero_at_padding(tokenizer):
    model = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    ids, mask = left_right_padded(tokenizer, [5, 9, 3, 9, 7], [12, 1, 4, 0, 6])
    ref = final_hidden(model, ids, mask)
    out = packed_final_hidden(model, ids, mask)
    m = mask.bool()
    torch.testing.assert_close(out[m], ref[m], rtol=0, atol=1e-5)
    assert torch.all(out[~m] == 0)


def test_packed_gradient_equals_padded(tokenizer):
    ref_model, model = (tiny_llama(tokenizer, 1, **STUDENT_SIZE) for _ in range(2))
    ids, mask = left_right_padded(tokenizer, [4, 8, 6], [10, 2, 5], seed=1)
    m = mask.bool()
    w = torch.randn(*ids.shape, STUDENT_SIZE["hidden_size"], generator=torch.Generator().manual_seed(3))
    (final_hidden(ref_model, ids, mask)[m] * w[m]).sum().backward()
    (packed_final_hidden(model, ids, mask)[m] * w[m]).sum().backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if ref_params[name].grad is None:  # the output layer: not used by the decoder
            assert p.grad is None, name
            continue
        ref = ref_params[name].grad
        assert ref.abs().max() > 0, name
        assert (p.grad - ref).norm() <= 1e-5 * ref.norm(), name  # fp32 rounding: measured 2-4e-7


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_computes_fewer_positions(tokenizer, monkeypatch, attention):
    """Under SDPA the decoder sees the real tokens alone, as one row; under another attention, rows of the longest
    real length, as few as first fit needs; never B x (P + T)."""
    model = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    model.set_attn_implementation(attention)
    seen = []
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or forward(**kw))
    ids, mask = left_right_padded(tokenizer, [10, 4, 6, 3], [20, 2, 8, 1])
    packed_final_hidden(model, ids, mask)
    # sdpa: 30 + 6 + 14 + 4 real tokens; eager: [0] alone (30 tokens); 14, 6 and 4 share a row
    assert ids.shape == (4, 30) and seen == ([(1, 54)] if attention == "sdpa" else [(2, 30)])


GQA_SIZE = {**STUDENT_SIZE, "num_attention_heads": 4, "num_key_value_heads": 2}


def alone(model, ids_N, lengths):
    """Each sequence's final hidden states from its own forward."""
    out, s = [], 0
    for n in lengths:
        out.append(model.get_decoder()(input_ids=ids_N[s:s + n][None], use_cache=False).last_hidden_state[0])
        s += n
    return torch.cat(out)


def test_segments_hidden_equals_each_sequence_alone(tokenizer):
    """One row of several sequences with their bounds (grouped-query attention): each token's hidden state and the
    gradient are those of the sequence alone, in fp32."""
    model = tiny_llama(tokenizer, 2, **GQA_SIZE)
    lengths = [5, 13, 1, 9, 20]
    ids_N = torch.randint(3, len(tokenizer), (sum(lengths),), generator=torch.Generator().manual_seed(0))
    w_N_H = torch.randn(sum(lengths), GQA_SIZE["hidden_size"], generator=torch.Generator().manual_seed(1))
    params = [p for n, p in model.named_parameters() if "lm_head" not in n]
    got = segments_hidden(model, ids_N, lengths)
    assert model.config._attn_implementation == packing.VARLEN_ATTENTION
    got_grads = torch.autograd.grad((got * w_N_H).sum(), params)
    ref = alone(model, ids_N, lengths)
    ref_grads = torch.autograd.grad((ref * w_N_H).sum(), params)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    for g, r in zip(got_grads, ref_grads):
        assert (g - r).norm() <= 1e-5 * r.norm()
    with pytest.raises(ValueError, match="do not split"):
        segments_hidden(model, ids_N, [5, 13])


def test_a_sliding_window_model_keeps_first_fit_rows(tokenizer):
    """A Mistral with a sliding window is not given sequence bounds (its window would be lost): it stays on SDPA
    and the sequences run in first-fit rows under the block mask, each as if alone."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), max_position_embeddings=512, sliding_window=64,
                           pad_token_id=tokenizer.pad_token_id, **GQA_SIZE)
    torch.manual_seed(5)
    model = MistralForCausalLM(config).eval()
    lengths = [6, 19, 4]
    ids_N = torch.randint(3, len(tokenizer), (sum(lengths),), generator=torch.Generator().manual_seed(4))
    got = segments_hidden(model, ids_N, lengths)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, alone(model, ids_N, lengths), rtol=0, atol=2e-6)


@pytest.mark.parametrize("budget", [128 * 2**20, 1000])
def test_bf16_products_attention_is_as_close_as_the_kernel(tokenizer, monkeypatch, budget):
    """Under bf16 autocast on a CPU, a layer's sequences run attention as two bf16 products with an fp32 softmax
    while the probabilities they keep fit PRODUCTS_MAX_BYTES: their hidden states are no further from the fp32 ones
    than those of PyTorch's kernel under the same autocast (and the kernel is not called); over the budget, the
    kernel runs."""
    monkeypatch.setattr(packing, "PRODUCTS_MAX_BYTES", budget)
    model = tiny_llama(tokenizer, 3, **{**GQA_SIZE, "num_hidden_layers": 2})
    lengths = [40, 7, 64, 25]
    ids_N = torch.randint(3, len(tokenizer), (sum(lengths),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = alone(model, ids_N, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kernel = alone(model, ids_N, lengths).float()
            calls = []
            sdpa = torch.nn.functional.scaled_dot_product_attention
            monkeypatch.setattr(packing.F, "scaled_dot_product_attention",
                                lambda *a, **k: calls.append(1) or sdpa(*a, **k))
            products = segments_hidden(model, ids_N, lengths).float()
    err_products, err_kernel = (products - ref).abs().max().item(), (kernel - ref).abs().max().item()
    assert 0 < err_products <= 1.5 * err_kernel, (err_products, err_kernel)
    assert len(calls) == (0 if budget > 1000 else 2 * len(lengths))  # 2 layers


def test_segments_hidden_under_gradient_checkpointing(tokenizer, monkeypatch):
    """Layers recomputed in the backward pass (two here) attend with the sequence bounds again: the gradient equals
    the one without checkpointing."""
    ref_model, model = (tiny_llama(tokenizer, 4, **{**GQA_SIZE, "num_hidden_layers": 2}) for _ in range(2))
    model.activation_checkpointing_enable()
    model.train(), ref_model.train()
    lengths = [11, 3, 17]
    ids_N = torch.randint(3, len(tokenizer), (sum(lengths),), generator=torch.Generator().manual_seed(3))
    with_bounds = []
    monkeypatch.setitem(AttentionInterface._global_mapping, packing.VARLEN_ATTENTION, lambda *a, **k: (
        with_bounds.append(k.get("cu_seq_lens_q") is not None) or packing.varlen_sdpa(*a, **k)))
    for m in (ref_model, model):
        hidden = segments_hidden(m, ids_N, lengths)
        forward_calls = len(with_bounds)
        hidden.square().sum().backward()
    assert with_bounds == [True] * 6 and forward_calls == 4  # model: 2 in the forward, 2 recomputed
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (p.grad - ref_params[name].grad).norm() <= 1e-5 * ref_params[name].grad.norm(), name


@pytest.mark.parametrize("objective", ["opd", "forward_kl"])
def test_a_packed_run_trains_as_the_padded_one(model_dirs, tmp_path, objective):
    """`opdlab train` with scoring.packing on ends at the weights of the same run padded (fp32, up to rounding),
    and both moved away from the start."""
    from test_train import init_weights, make_cfg, max_diff, weights

    from opdlab.train import train

    ends = {}
    for packing in (False, True):
        cfg = make_cfg(model_dirs, tmp_path / str(packing), f"objective.name={objective}", "train.steps=2",
                       f"scoring.packing={str(packing).lower()}", "rollout.max_new_tokens=12")
        ends[packing] = weights(train(cfg, progress=False), 2)
    assert max_diff(ends[False], init_weights(model_dirs)) > 1e-4
    assert max_diff(ends[False], ends[True]) < 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_the_training_loops_student_forward_runs_on_bounds(tokenizer, monkeypatch, lora):
    """The training loop calls the student through `PreparedStudent` (the prepared wrapper's decoder, the plain
    model's output layer), LoRA or not: its packed forward switches the model to the variable-length attention and
    passes the bounds, and its hidden states and gradients are those of the padded forward."""
    from opdlab.distributed import PreparedStudent, StudentDecoder

    models = []
    for _ in range(2):
        lm = tiny_llama(tokenizer, 5, **GQA_SIZE)
        if lora:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        models.append(lm)
    ref_lm, lm = models
    with_bounds = []
    monkeypatch.setitem(AttentionInterface._global_mapping, packing.VARLEN_ATTENTION, lambda *a, **k: (
        with_bounds.append(k.get("cu_seq_lens_q") is not None) or packing.varlen_sdpa(*a, **k)))
    ids, mask = left_right_padded(tokenizer, [5, 9, 3, 7], [12, 1, 4, 6], seed=2)
    got = packed_final_hidden(PreparedStudent(lm, StudentDecoder(lm)), ids, mask)
    base = lm.get_base_model() if lora else lm
    assert base.config._attn_implementation == packing.VARLEN_ATTENTION
    assert with_bounds == [True] * GQA_SIZE["num_hidden_layers"]
    ref = final_hidden(ref_lm, ids, mask)
    m = mask.bool()
    torch.testing.assert_close(got[m], ref[m], rtol=0, atol=2e-6)
    w_N_H = torch.randn(int(m.sum()), GQA_SIZE["hidden_size"], generator=torch.Generator().manual_seed(3))
    (got[m] * w_N_H).sum().backward()  # (a square loss would not do: through the final norm its gradient cancels)
    (ref[m] * w_N_H).sum().backward()
    ref_params = dict(ref_lm.named_parameters())
    trained = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        r = ref_params[name].grad
        assert (p.grad - r).norm() <= 1e-5 * r.norm(), name
