"""Tests of `opdlab.models.packing`: rollouts packed several to a row give each token the hidden state it has in
the padded layout (checked against the padded forward), and packing computes fewer positions.

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

import random

import pytest
import torch

from conftest import STUDENT_SIZE, tiny_llama
from opdlab.models.logprobs import final_hidden
from opdlab.models.packing import first_fit, packed_final_hidden


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


def test_packing_computes_fewer_positions(tokenizer, monkeypatch):
    """The decoder sees rows of the longest real length, as few as first fit needs, not B x (P + T)."""
    model = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    seen = []
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: seen.append(kw["input_ids"].shape) or forward(**kw))
    ids, mask = left_right_padded(tokenizer, [10, 4, 6, 3], [20, 2, 8, 1])
    packed_final_hidden(model, ids, mask)
    assert ids.shape == (4, 30) and seen == [(2, 30)]  # [0] alone (30 tokens); 14, 6 and 4 share a row


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
