"""Tests of special-token masking (`opdlab.rollout.masking`) and of every objective's use of `Rollouts.loss_mask_B_T`:
which ids the automatic set holds (special, chat-template and think-tag tokens when the two chat templates differ,
tokens the two tokenizers split differently; never EOS), and that an unmasked special token the teacher gives near-zero
probability dominates the loss while the mask removes exactly its contribution.

    python -m pytest tests/test_masking.py -q
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tokenizers import normalizers

from logit_batches import logit_batch
from opdlab.config import ObjectiveConfig
from opdlab.rollout.masking import masked_token_ids, mismatched_token_ids, special_token_ids, with_loss_mask
from opdlab.models.loading import build_char_tokenizer
from opdlab.objectives import OBJECTIVES

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def ids(tok, *tokens):
    return {tok.convert_tokens_to_ids(t) for t in tokens}


def thinking_variant(tok):
    """The same vocabulary with a teacher-style chat template that opens the answer with a think block."""
    t = copy.deepcopy(tok)
    t.chat_template = tok.chat_template.replace("assistant\n", "assistant\n<think>\n")
    return t


def test_special_and_template_tokens(tok):
    assert special_token_ids(tok) == ids(tok, "<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
    # one tokenizer, one template: nothing is masked automatically (the teacher's verdict on them is valid)
    assert masked_token_ids(tok, copy.deepcopy(tok), [], True, keep=[tok.eos_token_id]) == []
    # templates that differ: every special token but the stop token (EOS = <|im_end|> is still learnt)
    teacher_tok = thinking_variant(tok)
    masked = masked_token_ids(tok, teacher_tok, [], True, keep=[tok.eos_token_id])
    assert set(masked) == ids(tok, "<|pad|>", "<|im_start|>", "<|unk|>")
    assert set(masked_token_ids(tok, teacher_tok, ["<|im_end|>", "x"], True, keep=[tok.eos_token_id])) == \
        ids(tok, "<|pad|>", "<|im_start|>", "<|unk|>", "<|im_end|>", "x")
    assert masked_token_ids(tok, teacher_tok, [], False) == []
    assert masked_token_ids(tok, tok, ["y"], False) == [tok.convert_tokens_to_ids("y")]


def test_think_tags_and_template_markers_are_found(tok):
    t = copy.deepcopy(tok)
    t.add_tokens(["<think>", "</think>", "<|tool|>", "<|unused|>"])  # ordinary (non-special) added tokens
    t.chat_template = t.chat_template + "{% if tools %}<|tool|>{% endif %}"
    assert ids(t, "<think>", "</think>", "<|tool|>") <= special_token_ids(t)
    assert t.convert_tokens_to_ids("<|unused|>") not in special_token_ids(t)


def test_mismatched_tokens_are_the_differently_split_ones(tok):
    assert mismatched_token_ids(tok, tok) == set()
    assert mismatched_token_ids(tok, copy.deepcopy(tok)) == set()  # identical but distinct objects
    lower = copy.deepcopy(tok)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, splits 'A' as 'a'
    assert lower.get_vocab() == tok.get_vocab()
    expected = ids(tok, *[chr(c) for c in range(ord("A"), ord("Z") + 1)])
    assert mismatched_token_ids(tok, lower) == expected
    assert mismatched_token_ids(lower, tok) == expected
    assert expected <= set(masked_token_ids(tok, lower, [], True, keep=[tok.eos_token_id]))


def test_unknown_mask_token_names_the_field(tok):
    with pytest.raises(ValueError, match=r"objective.mask_tokens: 'not one token'"):
        masked_token_ids(tok, tok, ["not one token"], True)


# ---------------------------------------------------------------- the mask in the objectives


def direct_token_values(batch, name):
    """(B, T) float64 per-token loss values written out: sampled-token OPD on-policy (ratio 1) is
    log pi_old(y) - log pi_T(y); reverse_kl is KL(pi_theta || pi_T); lsm (support teacher_topk_sampled) is the KL
    of the two distributions renormalised on the teacher's top-K plus the sampled token."""
    logp = F.log_softmax(batch.z_B_T_V.detach().double(), -1)
    logq = F.log_softmax(batch.zt_B_T_V.double(), -1)
    if name == "opd":
        y = batch.ids_B_T[..., None]
        return (logp.gather(-1, y) - logq.gather(-1, y)).squeeze(-1)
    if name == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    out = torch.zeros(batch.ids_B_T.shape, dtype=torch.float64)
    for b, t in batch.mask_B_T.nonzero().tolist():  # S = teacher top-4 ∪ {y}
        S = sorted(set(logq[b, t].topk(4).indices.tolist()) | {batch.ids_B_T[b, t].item()})
        lp_hat, lq_hat = (F.log_softmax(x[b, t, S], -1) for x in (logp, logq))
        out[b, t] = (lp_hat.exp() * (lp_hat - lq_hat)).sum()
    return out


@pytest.mark.parametrize("name", ["opd", "reverse_kl", "lsm"])
def test_mask_removes_a_mismatched_special_token_exactly(tok, name):
    V = len(tok)
    batch = logit_batch(seed=3, B=3, T=6, V=V, lengths=[6, 4, 5], scale=1.0)
    im_start, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    with torch.no_grad():
        batch.ids_B_T[:, :] = torch.randint(10, V, batch.ids_B_T.shape, generator=torch.Generator().manual_seed(0))
        batch.ids_B_T[0, 2] = im_start  # the student emits a chat marker mid-completion...
        batch.z_B_T_V[0, 2, im_start] = 6.0  # ...with confidence,
        batch.zt_B_T_V[0, 2, im_start] = -30.0  # where the teacher gives it near-zero probability
        for b, n in enumerate([6, 4, 5]):
            batch.ids_B_T[b, n - 1] = eos  # every row ends with EOS
        batch.logp_old_B_T = F.log_softmax(batch.z_B_T_V.detach(), -1).gather(-1, batch.ids_B_T[..., None])[..., 0]
    # (lsm on the teacher's top-K alone never sees a token the teacher gives near-zero probability: the variant
    # that adds the sampled token to S does, and needs the mask)
    cfg = ObjectiveConfig(name=name, support_k=4, lsm={"support": "teacher_topk_sampled"})
    r, s, t = batch.inputs(top_k=4)
    # a teacher whose chat template differs from the student's: the special tokens are masked
    r_masked = with_loss_mask(r, masked_token_ids(tok, thinking_variant(tok), [], True, keep=[eos]))
    assert r_masked.loss_mask_B_T.sum() == r.completion_mask_B_T.sum() - 1
    assert r_masked.loss_mask_B_T[0, 2] == 0
    assert all(r_masked.loss_mask_B_T[b, n - 1] == 1 for b, n in enumerate([6, 4, 5]))  # EOS is still learnt
    unmasked = OBJECTIVES[name](r, s, t, cfg).loss.item()
    masked = OBJECTIVES[name](r_masked, s, t, cfg)

    values = direct_token_values(batch, name)
    keep = r_masked.loss_mask_B_T.bool()
    others = values[keep].sum() / keep.sum()
    assert masked.loss.item() == pytest.approx(others.item(), rel=1e-5, abs=1e-6)
    # unmasked, the one special token dominates: more than half of the summed loss, the mean more than doubled
    assert values[0, 2] > 0.5 * values[r.completion_mask_B_T.bool()].sum()
    assert unmasked > 2 * masked.loss.item() > 0
    (grad,) = torch.autograd.grad(masked.loss, batch.z_B_T_V)
    assert torch.all(grad[0, 2] == 0)  # and it teaches nothing
