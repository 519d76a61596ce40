"""Tests of LSM, teacher top-K local support matching (`opdlab.objectives.lsm`), for every `objective.lsm.support`:
loss, gradients and diagnostics against a direct float64 computation that builds each position's support S as a
Python set, gradients that reach only in-support logits, duplicates without NaN, and the head+tail term.

    python -m pytest tests/test_lsm.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from logit_batches import logit_batch
from opdlab.config import ObjectiveConfig
from opdlab.objectives import OBJECTIVES
from opdlab.objectives.lsm import renormalised_kl

torch.set_num_threads(1)

SUPPORTS = ["teacher_topk", "teacher_topk_sampled", "student_topk", "head_tail"]
K = 4


def support_set(support, logp_row, logq_row, y):
    """S at one position, as a sorted list of token ids."""
    if support == "student_topk":
        return sorted(set(logp_row.topk(K).indices.tolist()) | {y})
    S = set(logq_row.topk(K).indices.tolist())
    return sorted(S | {y}) if support == "teacher_topk_sampled" else sorted(S)


def direct_lsm(batch, support, kl_coef=1.0):
    """(loss, per-position supports) in float64; the loss is differentiable in a float64 copy of the logits."""
    z64 = batch.z_B_T_V.detach().double().requires_grad_(True)
    logp_all = F.log_softmax(z64, -1)
    logq_all = F.log_softmax(batch.zt_B_T_V.double(), -1)
    m = batch.mask_B_T.bool()
    total, supports = 0.0, {}
    for b, t in m.nonzero().tolist():
        y = batch.ids_B_T[b, t].item()
        S = support_set(support, logp_all[b, t].detach(), logq_all[b, t], y)
        supports[b, t] = S
        lp_hat = z64[b, t, S] - torch.logsumexp(z64[b, t, S], 0)
        lq_hat = logq_all[b, t, S] - torch.logsumexp(logq_all[b, t, S], 0)
        total = total + (lp_hat.exp() * (lp_hat - lq_hat)).sum()
        if support == "head_tail" and y not in S:
            advantage = -kl_coef * (batch.logp_old_B_T[b, t].double() - logq_all[b, t, y])
            ratio = torch.exp(logp_all[b, t, y] - batch.logp_old_B_T[b, t].double())
            total = total - ratio * advantage
    loss = total / m.sum()
    (grad,) = torch.autograd.grad(loss, z64)
    return loss.detach(), grad, supports


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_lsm_matches_direct_computation(support, on_policy):
    batch = logit_batch(seed=SUPPORTS.index(support) + 10 * on_policy, B=4, T=6, V=11, on_policy=on_policy)
    r, s, t = batch.inputs(top_k=K, chunk_size=5, keep_hidden=support == "student_topk")
    cfg = ObjectiveConfig(name="lsm", support_k=K, kl_coef=1.3, lsm={"support": support})
    out = OBJECTIVES["lsm"](r, s, t, cfg)
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)
    loss, expected_grad, supports = direct_lsm(batch, support, kl_coef=1.3)
    assert loss > 0.01
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    sizes = [len(S) for S in supports.values()]
    assert out.metrics["support/size"] == pytest.approx(sum(sizes) / len(sizes), rel=1e-6)
    if support in ("teacher_topk_sampled", "student_topk"):
        assert K < sum(sizes) / len(sizes) < K + 1  # the sampled token was outside S at some positions, not all
    if support == "head_tail":
        assert 0 < out.metrics["support/sampled_in_topk"] < 1  # both the head-only and the tail case occur


@pytest.mark.parametrize("support", ["teacher_topk", "teacher_topk_sampled", "student_topk"])
def test_gradient_reaches_only_in_support_logits(support):
    batch = logit_batch(seed=4, B=3, T=5, V=23)
    r, s, t = batch.inputs(top_k=K, keep_hidden=support == "student_topk")
    out = OBJECTIVES["lsm"](r, s, t, ObjectiveConfig(name="lsm", support_k=K, lsm={"support": support}))
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)
    _, _, supports = direct_lsm(batch, support)
    in_support = torch.zeros_like(grad, dtype=torch.bool)
    for (b, pos), S in supports.items():
        in_support[b, pos, S] = True
    assert torch.all(grad[~in_support] == 0)  # exactly zero: outside S, and on padding positions
    assert (grad[in_support] != 0).float().mean() > 0.9


def test_head_tail_gradient_outside_support_is_the_policy_gradient_term():
    """Where y_t is outside the teacher's top-K, head_tail = head + tail; the tail alone is the sampled-token
    policy gradient, reaching the logits through log pi_theta(y_t) (all of them, via the normaliser)."""
    batch = logit_batch(seed=2, B=3, T=6, V=19)
    r, s, t = batch.inputs(top_k=K)
    cfg = lambda support: ObjectiveConfig(name="lsm", support_k=K, lsm={"support": support})  # noqa: E731
    head = OBJECTIVES["lsm"](r, s, t, cfg("teacher_topk")).loss
    both = OBJECTIVES["lsm"](r, s, t, cfg("head_tail"))
    outside = batch.mask_B_T.bool() & ~(t.topk_ids_B_T_K == batch.ids_B_T[..., None]).any(-1)
    assert outside.any() and (~outside & batch.mask_B_T.bool()).any()
    tail = -(torch.exp(s.logp_B_T - r.logp_old_B_T) * -(r.logp_old_B_T - t.logp_B_T))[outside].sum()
    n = batch.mask_B_T.sum()
    torch.testing.assert_close(both.loss, head + tail / n, rtol=1e-6, atol=1e-7)
    assert both.metrics["support/tail_loss"] == pytest.approx((tail / n).item(), rel=1e-5)


def test_duplicate_support_slots_give_no_nan():
    """S = TopK ∪ {y} where y is already in the top-K: the extra slot is invalid, not a second copy of y."""
    batch = logit_batch(seed=1, B=2, T=4, V=9)
    with torch.no_grad():  # make the sampled token the student's and the teacher's favourite everywhere
        batch.z_B_T_V.scatter_(-1, batch.ids_B_T[..., None], 8.0)
        batch.zt_B_T_V.scatter_(-1, batch.ids_B_T[..., None], 8.0)
    for support in ("teacher_topk_sampled", "student_topk"):
        r, s, t = batch.inputs(top_k=K, keep_hidden=True)
        out = OBJECTIVES["lsm"](r, s, t, ObjectiveConfig(name="lsm", support_k=K, lsm={"support": support}))
        (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert out.metrics["support/size"] == K
        torch.testing.assert_close(out.loss.double(), direct_lsm(batch, support)[0], rtol=1e-5, atol=1e-6)


def test_renormalisation_is_what_makes_supports_comparable():
    """Scaling the teacher's log-probs on S by a constant (a different mass outside S) changes nothing."""
    g = torch.Generator().manual_seed(0)
    z, lq = torch.randn(5, 6, generator=g), F.log_softmax(torch.randn(5, 6, generator=g), -1)
    valid = torch.ones(5, 6, dtype=torch.bool)
    torch.testing.assert_close(renormalised_kl(z, lq, valid), renormalised_kl(z + 3.0, lq - 2.0, valid))
    identical = renormalised_kl(lq, lq, valid)
    assert identical.abs().max() < 1e-6


def test_diagnostics_match_direct_computation():
    batch = logit_batch(seed=7, B=3, T=5, V=15)
    r, s, t = batch.inputs(top_k=K)
    out = OBJECTIVES["lsm"](r, s, t, ObjectiveConfig(name="lsm", support_k=K))
    m = batch.mask_B_T.bool()
    logp = F.log_softmax(batch.z_B_T_V.detach().double(), -1)[m]
    logq = F.log_softmax(batch.zt_B_T_V.double(), -1)[m]
    S = [set(row.topk(K).indices.tolist()) for row in logq]
    S_student = [set(row.topk(K).indices.tolist()) for row in logp]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = {
        "support/teacher_mass": mean([sum(logq[i, v].exp().item() for v in S[i]) for i in range(len(S))]),
        "support/student_mass": mean([sum(logp[i, v].exp().item() for v in S[i]) for i in range(len(S))]),
        "support/topk_overlap": mean([len(S[i] & S_student[i]) / K for i in range(len(S))]),
    }
    for key, value in expected.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-5), key
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_teacher_request_and_errors():
    request = OBJECTIVES["lsm"].teacher_request
    assert request(ObjectiveConfig(name="lsm", support_k=7)).top_k == 7
    assert not request(ObjectiveConfig(name="lsm")).hidden
    assert request(ObjectiveConfig(name="lsm", lsm={"support": "student_topk"})).hidden
    assert OBJECTIVES["lsm"].default_top_p == 0.9
    r, s, t = logit_batch(seed=0).inputs(top_k=2)
    with pytest.raises(ValueError, match="top-4"):
        OBJECTIVES["lsm"](r, s, t, ObjectiveConfig(name="lsm", support_k=4))
    r, s, t = logit_batch(seed=0).inputs(top_k=4, keep_hidden=False)
    with pytest.raises(ValueError, match="keep_hidden=True"):
        OBJECTIVES["lsm"](r, s, t, ObjectiveConfig(name="lsm", support_k=4, lsm={"support": "student_topk"}))
