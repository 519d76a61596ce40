"""Tests of sampling (`opdlab.rollout.builtin`), teacher scoring (`opdlab.teacher.scoring`) and the student's chunked
forward (`opdlab.models.logprobs`) against a plain, unchunked full-logit forward `model(input_ids, attention_mask,
position_ids).logits` and independent re-implementations.

    python -m pytest tests/test_scoring.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import STUDENT_SIZE, TEACHER_SIZE, tiny_llama
from opdlab.config import ObjectiveConfig
from opdlab.models.logprobs import student_forward
from opdlab.objectives import get_objective
from opdlab.rollout.masking import with_loss_mask
from opdlab.models.prompts import encode_prompts, render_prompt
from opdlab.rollout.builtin import sample, top_p_filter
from opdlab.teacher.scoring import score
from opdlab.types import Problem

QUESTIONS = ["Compute 1 + 2.", "Compute 12 + 34 - 5 + 6.", "Hi", "Compute 9 - 3 + 2."]
MAX_NEW = 12


def problems(questions=QUESTIONS):
    return [Problem(uid=str(i), question=q, answer="0") for i, q in enumerate(questions)]


def boost_eos(model, tokenizer, scale=0.8, seed=0):
    """Give the EOS row of the output layer a large random direction so rollouts stop at varied positions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[tokenizer.eos_token_id] = torch.randn(w.shape[1], generator=g) * scale
    return model


def full_logits(model, ids, mask):
    """The reference: one plain forward over the whole sequence, all logits, no cache, no chunking."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()


def completion_logits(model, prompt_ids, prompt_mask, comp_ids, comp_mask):
    """(B, T, rows) logits predicting each completion token, from the full forward."""
    logits = full_logits(model, torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1))
    P, T = prompt_ids.shape[1], comp_ids.shape[1]
    return logits[:, P - 1:P - 1 + T]


def reference_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most probable tokens, in order, until their total probability reaches top_p (always >= 1 token)."""
    out = np.full_like(logits, -np.inf)
    for b, row in enumerate(logits):
        p = np.exp(row - row.max())
        p /= p.sum()
        total = 0.0
        for v in sorted(range(len(row)), key=lambda i: -row[i]):
            out[b, v] = row[v]
            total += p[v]
            if total >= top_p:
                break
    return out


# ---------------------------------------------------------------- top-p


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_reference(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 23, generator=g, dtype=torch.float64) * 2
    got = top_p_filter(logits, top_p)
    ref = reference_top_p(logits.numpy(), top_p) if top_p < 1 else logits.numpy()
    np.testing.assert_array_equal(np.isinf(got.numpy()), np.isinf(ref))
    np.testing.assert_array_equal(got.numpy()[~np.isinf(ref)], ref[~np.isinf(ref)])
    if 0.3 <= top_p < 1:
        assert np.isinf(ref).any() and (~np.isinf(ref)).sum(1).max() > 1  # the case is not degenerate


def test_top_p_filter_exact_boundary():
    # probabilities 0.5, 0.3, 0.2: with top_p = 0.8 the first two reach it exactly, the third is dropped
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    got = top_p_filter(logits, 0.8 - 1e-9)
    assert torch.isinf(got[0]).tolist() == [True, False, False]
    got = top_p_filter(logits, 0.5 - 1e-9)
    assert torch.isinf(got[0]).tolist() == [True, False, True]


# ---------------------------------------------------------------- sampling


@pytest.fixture
def eos_model(tokenizer):
    return boost_eos(tiny_llama(tokenizer, 1, **STUDENT_SIZE), tokenizer)


def test_sample_logp_old_matches_full_forward_and_masks(eos_model, tokenizer):
    r = sample(eos_model, tokenizer, problems(), max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(0))
    prompt_lens = r.prompt_mask_B_P.sum(1)
    assert len(set(prompt_lens.tolist())) == len(QUESTIONS)  # left padding of different amounts
    # the prompts are the rendered chat prompts, left-padded
    ids, mask = encode_prompts(tokenizer, [render_prompt(tokenizer, q) for q in QUESTIONS])
    assert torch.equal(r.prompt_ids_B_P, ids) and torch.equal(r.prompt_mask_B_P, mask)
    assert torch.all(r.prompt_ids_B_P[r.prompt_mask_B_P == 0] == tokenizer.pad_token_id)

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stopped = 0
    for b in range(len(QUESTIONS)):
        row = r.completion_ids_B_T[b].tolist()
        first = row.index(eos) if eos in row else None
        n = first + 1 if first is not None else len(row)
        assert r.completion_mask_B_T[b].tolist() == [1] * n + [0] * (len(row) - n)
        assert row[n:] == [pad] * (len(row) - n)
        stopped += first is not None and first < len(row) - 1
    assert stopped >= 2  # several rows stopped early, at different points
    assert r.completion_ids_B_T.shape[1] <= MAX_NEW

    m = r.completion_mask_B_T.bool()
    logits = completion_logits(eos_model, r.prompt_ids_B_P, r.prompt_mask_B_P, r.completion_ids_B_T,
                               r.completion_mask_B_T)
    ref = F.log_softmax(logits, -1).gather(-1, r.completion_ids_B_T[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logp_old_B_T.double()[m], ref[m], rtol=0, atol=2e-5)
    # at temperature 1 without top-p the sampler's distribution is the policy itself
    torch.testing.assert_close(r.sampler_logp_B_T[m], r.logp_old_B_T[m], rtol=0, atol=1e-6)
    # texts are the decoded completions up to and including EOS, special tokens dropped
    for b, text in enumerate(r.texts):
        assert text == tokenizer.decode(r.completion_ids_B_T[b][m[b]], skip_special_tokens=True)


def test_sampler_logp_under_temperature_and_top_p(eos_model, tokenizer):
    temperature, top_p = 0.7, 0.8
    r = sample(eos_model, tokenizer, problems(), max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p,
               generator=torch.Generator().manual_seed(1))
    m = r.completion_mask_B_T.bool()
    logits = completion_logits(eos_model, r.prompt_ids_B_P, r.prompt_mask_B_P, r.completion_ids_B_T,
                               r.completion_mask_B_T)
    B, T, Vr = logits.shape
    filtered = torch.from_numpy(reference_top_p((logits / temperature).reshape(-1, Vr).numpy(), top_p))
    sampler_ref = F.log_softmax(filtered, -1).reshape(B, T, Vr)
    ids = r.completion_ids_B_T[..., None]
    torch.testing.assert_close(r.sampler_logp_B_T.double()[m], sampler_ref.gather(-1, ids).squeeze(-1)[m],
                               rtol=0, atol=2e-5)
    # log pi_old stays the untempered, untruncated policy
    torch.testing.assert_close(r.logp_old_B_T.double()[m],
                               F.log_softmax(logits, -1).gather(-1, ids).squeeze(-1)[m], rtol=0, atol=2e-5)
    assert torch.all(torch.isfinite(sampler_ref.gather(-1, ids).squeeze(-1)[m]))  # only kept tokens were sampled
    assert (r.sampler_logp_B_T[m] - r.logp_old_B_T[m]).abs().max() > 0.05  # the two really differ here


def test_greedy_is_argmax_of_full_forward(eos_model, tokenizer):
    r = sample(eos_model, tokenizer, problems(), max_new_tokens=MAX_NEW, temperature=0)
    m = r.completion_mask_B_T.bool()
    logits = completion_logits(eos_model, r.prompt_ids_B_P, r.prompt_mask_B_P, r.completion_ids_B_T,
                               r.completion_mask_B_T)
    assert torch.equal(logits.argmax(-1)[m], r.completion_ids_B_T[m])
    assert m.sum() >= len(QUESTIONS) * 2


def test_same_seed_same_tokens(eos_model, tokenizer):
    runs = [sample(eos_model, tokenizer, problems(), max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].completion_ids_B_T, runs[1].completion_ids_B_T)
    assert torch.equal(runs[0].logp_old_B_T, runs[1].logp_old_B_T)
    assert not torch.equal(runs[0].completion_ids_B_T[:, :3], runs[2].completion_ids_B_T[:, :3])


@pytest.mark.parametrize("per_row", [False, True])
def test_draw_samples_each_rows_distribution(per_row):
    """Inverse-CDF draws match each row's probabilities (chi-square over 20,000 draws per row), never pick a
    zero-probability token, and with per-row generators a row's draws do not depend on the other rows."""
    from opdlab.rollout.builtin import draw

    g = torch.Generator().manual_seed(0)
    probs_B_V = torch.rand(3, 7, generator=g) ** 3
    probs_B_V[:, 2] = 0.0  # a filtered-out token (top-p, vocabulary padding)
    probs_B_V /= probs_B_V.sum(-1, keepdim=True)
    n = 20_000
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    shared = torch.Generator().manual_seed(1)
    draws_N_B = torch.stack([draw(probs_B_V, gens if per_row else shared) for _ in range(n)])
    for b in range(3):
        counts = torch.bincount(draws_N_B[:, b], minlength=7)
        assert counts[2] == 0
        expected = probs_B_V[b].double() * n
        keep = expected > 0
        stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
        assert keep.sum() == 6 and stat < 25.74, stat  # chi-square, 5 degrees of freedom: P(stat > 25.74) = 1e-4
    if per_row:  # row 1 alone, from a fresh copy of its generator, draws what it drew inside the batch
        alone = torch.Generator().manual_seed(11)
        again = torch.stack([draw(probs_B_V[1:2], [alone]) for _ in range(200)])[:, 0]
        assert torch.equal(again, draws_N_B[:200, 1])


def test_sample_never_draws_padding_rows(tokenizer):
    """With an output layer padded beyond the tokenizer, and the padded rows' logits made huge, sampling with
    vocab_size = len(tokenizer) never draws them and log pi_old is normalised over the real vocabulary only."""
    V = len(tokenizer)
    model = boost_eos(tiny_llama(tokenizer, 3, extra_rows=5, **STUDENT_SIZE), tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[V:] *= 100
    r = sample(model, tokenizer, problems(), max_new_tokens=6, generator=torch.Generator().manual_seed(0),
               vocab_size=V)
    m = r.completion_mask_B_T.bool()
    assert r.completion_ids_B_T.max() < V
    logits = completion_logits(model, r.prompt_ids_B_P, r.prompt_mask_B_P, r.completion_ids_B_T, r.completion_mask_B_T)
    # without vocab_size the padding rows would win at most positions
    assert (logits[..., V:].max(-1).values > logits[..., :V].max(-1).values)[m].float().mean() > 0.5
    ref = F.log_softmax(logits[..., :V], -1).gather(-1, r.completion_ids_B_T[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logp_old_B_T.double()[m], ref[m], rtol=0, atol=2e-5)


# ---------------------------------------------------------------- teacher scoring


@pytest.fixture
def rollouts(eos_model, tokenizer):
    return sample(eos_model, tokenizer, problems(), max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize("own_prompt", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_teacher_score_matches_full_logits(tokenizer, rollouts, chunk_size, own_prompt, packing):
    V, K = len(tokenizer), 5
    teacher = tiny_llama(tokenizer, 4, extra_rows=7, **TEACHER_SIZE)  # 7 padding rows in the output layer
    with torch.no_grad():
        teacher.get_output_embeddings().weight[V:] *= 50  # so including them would change every number
    if own_prompt:
        # a privileged teacher prompt, of other lengths than the student's
        texts = [render_prompt(tokenizer, "Solution: " + "x" * (3 * i) + " | " + q) for i, q in enumerate(QUESTIONS)]
        p_ids, p_mask = encode_prompts(tokenizer, texts)
        assert p_ids.shape[1] != rollouts.prompt_ids_B_P.shape[1]
        s = score(teacher, rollouts, V, top_k=K, chunk_size=chunk_size, teacher_prompt_ids_B_P=p_ids,
                  teacher_prompt_mask_B_P=p_mask, packing=packing)
    else:
        p_ids, p_mask = rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P
        s = score(teacher, rollouts, V, top_k=K, chunk_size=chunk_size, packing=packing)
    logits = completion_logits(teacher, p_ids, p_mask, rollouts.completion_ids_B_T, rollouts.completion_mask_B_T)
    assert logits.shape[-1] == V + 7
    logp = F.log_softmax(logits[..., :V], -1)
    m = rollouts.completion_mask_B_T.bool()
    tol = dict(rtol=0, atol=2e-5)
    torch.testing.assert_close(s.logp_B_T.double()[m],
                               logp.gather(-1, rollouts.completion_ids_B_T[..., None]).squeeze(-1)[m], **tol)
    torch.testing.assert_close(s.entropy_B_T.double()[m], -(logp.exp() * logp).sum(-1)[m], **tol)
    torch.testing.assert_close(s.maxp_B_T.double()[m], logp.exp().max(-1).values[m], **tol)
    ref_lp, ref_ids = logp.topk(K, dim=-1)
    assert s.topk_ids_B_T_K.shape == (*m.shape, K)
    assert torch.equal(s.topk_ids_B_T_K[m], ref_ids[m])
    torch.testing.assert_close(s.topk_logp_B_T_K.double()[m], ref_lp[m], **tol)
    assert s.maxp_B_T[m].mean() > 5 / V  # a peaked teacher, far from uniform (1 / V)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_full_vocab_objectives_supply_the_teacher_stats_score_leaves_pending(tokenizer, rollouts, name):
    """With `pending_B_T`, `score` makes logits only off the loss positions; the full-vocabulary objective returns
    the teacher's log-prob / entropy / max-prob at its loss positions from its own logits, micro-batch by
    micro-batch, and once written in they equal what `score` computes by itself, as do the objective's loss and
    metrics."""
    V = len(tokenizer)
    teacher = tiny_llama(tokenizer, 4, **TEACHER_SIZE)
    student = tiny_llama(tokenizer, 5, **STUDENT_SIZE)
    # leave one frequent token out of the loss, as special-token masking does, so some positions stay with score()
    frequent = int(rollouts.completion_ids_B_T[rollouts.completion_mask_B_T.bool()].mode().values)
    r = with_loss_mask(rollouts, [frequent])
    loss_B_T, comp_B_T = r.loss_mask_B_T.bool(), r.completion_mask_B_T.bool()
    assert 0 < int((comp_B_T & ~loss_B_T).sum()) < int(loss_B_T.sum())
    rows_scored = []
    hook = teacher.get_output_embeddings().register_forward_hook(lambda m, i, o: rows_scored.append(i[0].shape[0]))
    full = score(teacher, r, V, keep_hidden=True, chunk_size=5)
    n_full, rows_scored[:] = sum(rows_scored), []
    pending = score(teacher, r, V, keep_hidden=True, chunk_size=5, pending_B_T=r.loss_mask_B_T)
    hook.remove()
    assert n_full == int(comp_B_T.sum()) and sum(rows_scored) == int((comp_B_T & ~loss_B_T).sum())
    assert (pending.logp_B_T[loss_B_T] == 0).all()
    cfg = ObjectiveConfig(name=name)
    objective = get_objective(name)
    assert objective.teacher_request(cfg).stats_from_objective
    for mb in (slice(0, 2), slice(2, len(r.problems))):
        r_mb = r.select(mb)
        s_mb = student_forward(student, r_mb, V, chunk_size=4)
        out = objective(r_mb, s_mb, pending.select(mb), cfg)
        ref = objective(r_mb, s_mb, full.select(mb), cfg)
        pending.fill_pending(mb, out.teacher_stats)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
        assert out.metrics.keys() == ref.metrics.keys()
        for k in out.metrics:
            assert out.metrics[k] == pytest.approx(ref.metrics[k], abs=1e-5), k
    for field_name in ("logp_B_T", "entropy_B_T", "maxp_B_T"):
        torch.testing.assert_close(getattr(pending, field_name)[comp_B_T], getattr(full, field_name)[comp_B_T],
                                   rtol=0, atol=2e-5)


def test_positions_left_pending_are_fp32_with_a_bf16_teacher(tokenizer, rollouts):
    """With every position left to the objective, `score` makes no logits; the statistics it leaves to be filled
    are fp32 even when the teacher is stored in bf16, so the objective's fp32 statistics are written in unrounded.
    (They were bf16, and a batch's sum of ~1000 max-probabilities near 1, rounded to bf16's spacing of 8 there,
    made the SmolLM2 demo's logged teacher/maxp read 1.0019.)"""
    V = len(tokenizer)
    teacher = tiny_llama(tokenizer, 4, **TEACHER_SIZE).to(torch.bfloat16)
    comp_B_T = rollouts.completion_mask_B_T.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pending = score(teacher, rollouts, V, keep_hidden=True, pending_B_T=rollouts.completion_mask_B_T)
    assert pending.hidden_B_T_H.dtype == torch.bfloat16  # the case: the teacher's hidden states are bf16
    stats = {"logp": torch.full((int(comp_B_T.sum()),), -1e-3), "entropy": torch.full((int(comp_B_T.sum()),), 0.01),
             "maxp": torch.full((int(comp_B_T.sum()),), 0.999)}
    pending.fill_pending(slice(0, len(rollouts.problems)), stats)
    for name, field_name in (("logp", "logp_B_T"), ("entropy", "entropy_B_T"), ("maxp", "maxp_B_T")):
        assert getattr(pending, field_name).dtype == torch.float32, field_name
        torch.testing.assert_close(getattr(pending, field_name)[comp_B_T], stats[name], rtol=0, atol=0)


def test_teacher_prompt_changes_scores(tokenizer, rollouts):
    """Guard for the test above: the teacher prompt really enters the scores."""
    V = len(tokenizer)
    teacher = tiny_llama(tokenizer, 4, **TEACHER_SIZE)
    texts = [render_prompt(tokenizer, "Other context. " + q) for q in QUESTIONS]
    p_ids, p_mask = encode_prompts(tokenizer, texts)
    a = score(teacher, rollouts, V)
    b = score(teacher, rollouts, V, teacher_prompt_ids_B_P=p_ids, teacher_prompt_mask_B_P=p_mask)
    m = rollouts.completion_mask_B_T.bool()
    assert (a.logp_B_T[m] - b.logp_B_T[m]).abs().max() > 1e-3


# ---------------------------------------------------------------- student forward


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize("packing", [False, True])
def test_student_forward_logp_and_grad_match_unchunked(tokenizer, rollouts, chunk_size, packing):
    V = len(tokenizer)
    ref_model = tiny_llama(tokenizer, 1, extra_rows=3, **STUDENT_SIZE)
    model = tiny_llama(tokenizer, 1, extra_rows=3, **STUDENT_SIZE)
    m = rollouts.completion_mask_B_T.bool()

    # reference: plain forward, full logits of the real vocabulary, sum of log-probs of the sampled tokens
    ids = rollouts.input_ids()
    mask = rollouts.attention_mask()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = ref_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P, T = rollouts.prompt_ids_B_P.shape[1], rollouts.completion_ids_B_T.shape[1]
    logp_all = F.log_softmax(logits[:, P - 1:P - 1 + T, :V].float(), -1)
    ref_logp = logp_all.gather(-1, rollouts.completion_ids_B_T[..., None]).squeeze(-1)
    ref_logp[m].sum().backward()

    out = student_forward(model, rollouts, V, chunk_size=chunk_size, packing=packing)
    torch.testing.assert_close(out.logp_B_T[m], ref_logp[m].detach(), rtol=0, atol=2e-5)
    assert torch.all(out.logp_B_T[~m] == 0)
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    torch.testing.assert_close(out.entropy_B_T[m], ref_entropy[m], rtol=0, atol=2e-5)
    out.logp_B_T[m].sum().backward()

    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert ref_params[name].grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # the padding rows of the output layer get no gradient
    assert torch.all(model.get_output_embeddings().weight.grad[V:] == 0)


def test_stats_without_top_k_hold_no_chunk_logits():
    """With top_k = 0 the empty top-K results must be new tensors: empty views of a chunk's (N, V) log-probs kept
    every chunk's storage alive until the end of `token_stats`, i.e. O(N x V) memory, what chunking is there to
    avoid."""
    from opdlab.models.logprobs import _stats_chunk

    head = torch.nn.Linear(8, 50, bias=False)
    *_, ids_N_K, logp_N_K = _stats_chunk(torch.randn(6, 8), torch.zeros(6, dtype=torch.long), head, 50, None, 0)
    assert ids_N_K.shape == (6, 0) and logp_N_K.shape == (6, 0)
    assert ids_N_K.untyped_storage().nbytes() == 0 and logp_N_K.untyped_storage().nbytes() == 0
