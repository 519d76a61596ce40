"""Numerical tests of the privileged objectives (`opdlab.objectives.privileged`): privileged_full,
privileged_partial and anchored_residual against direct float64 computations on a small vocabulary (loss and gradient,
every divergence, the skipped first tokens, the top-K support), chunked == unchunked, the lambda limits and the
diagnostics.

    python -m pytest tests/test_privileged_objectives.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from logit_batches import logit_batch
from opdlab.config import ObjectiveConfig
from opdlab.objectives import OBJECTIVES
from opdlab.types import TeacherScores

torch.set_num_threads(1)


def inputs(seed: int, chunk_size: int = 1024, T: int = 8, shift: float = 1.5):
    """(batch, rollouts, student, teacher) with teacher = full view (batch.zt) and teacher.partial = the full view's
    logits plus a random perturbation, as two views of one teacher would differ."""
    batch = logit_batch(seed, T=T)
    r, s, t = batch.inputs(chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed + 100)
    zp_B_T_V = batch.zt_B_T_V + shift * torch.randn(batch.zt_B_T_V.shape, generator=g)
    logq = F.log_softmax(zp_B_T_V, -1)
    t.partial = TeacherScores(
        logp_B_T=logq.gather(-1, batch.ids_B_T[..., None]).squeeze(-1), topk_ids_B_T_K=t.topk_ids_B_T_K,
        topk_logp_B_T_K=t.topk_logp_B_T_K, entropy_B_T=t.entropy_B_T, maxp_B_T=t.maxp_B_T, hidden_B_T_H=zp_B_T_V,
        lm_head=torch.nn.Identity(), vocab_size=zp_B_T_V.shape[-1])
    return batch, zp_B_T_V, r, s, t


def direct_target(zf, zp, target, lam, clip):
    """The target distribution in float64, from its definition."""
    log_f, log_p = F.log_softmax(zf.double(), -1), F.log_softmax(zp.double(), -1)
    if target == "privileged_full":
        return Categorical(logits=log_f)
    if target == "privileged_partial":
        return Categorical(logits=log_p)
    return Categorical(logits=log_p + lam * torch.clamp(log_f - log_p, -clip, clip))  # Categorical normalises


def direct_loss(z64, q, divergence, beta):
    p = Categorical(logits=z64)
    if divergence == "kl_target_student":
        return kl_divergence(q, p)
    if divergence == "kl_student_target":
        return kl_divergence(p, q)
    m = Categorical(probs=beta * q.probs + (1 - beta) * p.probs)
    return beta * kl_divergence(q, m) + (1 - beta) * kl_divergence(p, m)


CASES = [("anchored_residual", "kl_target_student", 0.8, 5.0), ("anchored_residual", "kl_student_target", 1.2, 0.7),
         ("anchored_residual", "jsd", 0.6, 5.0), ("privileged_full", "kl_target_student", 0.8, 5.0),
         ("privileged_partial", "kl_student_target", 0.8, 5.0), ("privileged_partial", "jsd", 0.8, 5.0)]


@pytest.mark.parametrize("name, divergence, lam, clip", CASES)
@pytest.mark.parametrize("skip", [0, 3])
def test_objective_matches_direct_computation(name, divergence, lam, clip, skip):
    batch, zp, r, s, t = inputs(CASES.index((name, divergence, lam, clip)), chunk_size=5)
    cfg = ObjectiveConfig(name=name, privileged={"divergence": divergence, "skip_first": skip},
                          anchored_residual={"lambda": lam, "clip": clip}, divergence={"beta": 0.3})
    out = OBJECTIVES[name](r, s, t, cfg)
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)

    z64 = batch.z_B_T_V.detach().double().requires_grad_(True)
    keep = batch.mask_B_T.bool() & (torch.arange(batch.mask_B_T.shape[1]) >= skip)[None, :]
    per_token = direct_loss(z64, direct_target(batch.zt_B_T_V, zp, name, lam, clip), divergence, 0.3)
    expected = per_token[keep].sum() / keep.sum()
    (expected_grad,) = torch.autograd.grad(expected, z64)
    assert expected > 0.05
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[~keep] == 0) and torch.all(grad[keep].abs().sum(-1) > 0)  # skipped tokens: no gradient
    assert out.metrics["div/target"] == pytest.approx(per_token[keep].mean().item(), rel=1e-5)


def test_clip_is_active_in_the_tested_case():
    """The clip of case 2 (c = 0.7) really cuts residuals, so the test above checks it."""
    batch, zp, *_ = inputs(1)
    residual = F.log_softmax(batch.zt_B_T_V, -1) - F.log_softmax(zp, -1)
    assert (residual.abs() > 0.7).float().mean() > 0.2


@pytest.mark.parametrize("name", ["anchored_residual", "privileged_full"])
@pytest.mark.parametrize("divergence", ["kl_target_student", "kl_student_target"])
def test_chunked_equals_unchunked(name, divergence):
    losses, grads = [], []
    for chunk in (1, 4, 1024):
        batch, _, r, s, t = inputs(7, chunk_size=chunk)
        cfg = ObjectiveConfig(name=name, privileged={"divergence": divergence, "top_k": 0})
        out = OBJECTIVES[name](r, s, t, cfg)
        losses.append(out.loss.detach())
        grads.append(torch.autograd.grad(out.loss, batch.z_B_T_V)[0])
    for loss, grad in zip(losses[:-1], grads[:-1]):
        torch.testing.assert_close(loss, losses[-1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grads[-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["kl_target_student", "kl_student_target"])
def test_top_k_support_of_the_ar_target(divergence):
    K = 4
    batch, zp, r, s, t = inputs(11, chunk_size=3)
    cfg = ObjectiveConfig(name="anchored_residual", privileged={"divergence": divergence, "top_k": K, "skip_first": 0})
    out = OBJECTIVES["anchored_residual"](r, s, t, cfg)
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)

    z64 = batch.z_B_T_V.detach().double().requires_grad_(True)
    q_full = direct_target(batch.zt_B_T_V, zp, "anchored_residual", 0.8, 5.0).logits  # normalised log-probs
    ids = q_full.topk(K, dim=-1).indices
    q_S = Categorical(logits=q_full.gather(-1, ids))
    p_S = Categorical(logits=z64.gather(-1, ids))
    per_token = kl_divergence(q_S, p_S) if divergence == "kl_target_student" else kl_divergence(p_S, q_S)
    m = batch.mask_B_T.bool()
    expected = per_token[m].sum() / m.sum()
    (expected_grad,) = torch.autograd.grad(expected, z64)
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    outside = torch.ones_like(grad, dtype=torch.bool).scatter(-1, ids, False)
    assert torch.all(grad[outside] == 0)  # tokens outside the support get no gradient


def test_lambda_limits():
    """lambda = 1 with a clip wider than every residual is the full view; lambda = 0 is the partial view."""
    def loss(name, **kw):
        _, _, r, s, t = inputs(3)
        return OBJECTIVES[name](r, s, t, ObjectiveConfig(name=name, **kw)).loss.detach()

    torch.testing.assert_close(loss("anchored_residual", anchored_residual={"lambda": 1.0, "clip": 1e3}),
                               loss("privileged_full"))
    torch.testing.assert_close(loss("anchored_residual", anchored_residual={"lambda": 0.0}), loss("privileged_partial"))
    assert not torch.allclose(loss("anchored_residual", anchored_residual={"lambda": 0.8}), loss("privileged_full"))


def test_diagnostics_match_direct_computation():
    batch, zp, r, s, t = inputs(5)
    out = OBJECTIVES["anchored_residual"](r, s, t, ObjectiveConfig(name="anchored_residual",
                                                                   privileged={"skip_first": 2}))
    keep = batch.mask_B_T.bool() & (torch.arange(batch.mask_B_T.shape[1]) >= 2)[None, :]
    pf, pp = Categorical(logits=batch.zt_B_T_V.double()), Categorical(logits=zp.double())
    pi = Categorical(logits=batch.z_B_T_V.detach().double())
    shift = kl_divergence(pf, pp)[keep].mean().item()
    uptake = (kl_divergence(pi, pp) - kl_divergence(pi, pf))[keep].mean().item()
    m = out.metrics
    assert m["priv/belief_shift"] == pytest.approx(shift, rel=1e-5)
    assert m["priv/uptake"] == pytest.approx(uptake, rel=1e-4, abs=1e-6)
    assert m["priv/uptake_ratio"] == pytest.approx(uptake / shift, rel=1e-4)
    assert m["priv/entropy_partial"] == pytest.approx(pp.entropy()[keep].mean().item(), rel=1e-5)
    # top-16 overlap with V = 13: every token is in both top sets
    assert m["priv/top16_overlap"] == pytest.approx(1.0)
    # drift: the loss's divergence over the first / last quarter of positions of rollouts at least median length
    per_token = direct_loss(batch.z_B_T_V.detach().double(),
                            direct_target(batch.zt_B_T_V, zp, "anchored_residual", 0.8, 5.0), "kl_target_student", 0)
    lengths = batch.mask_B_T.sum(1)
    long = lengths >= lengths.float().median()
    quarter = (4 * torch.arange(batch.mask_B_T.shape[1])[None, :] // lengths[:, None]).clamp(max=3)
    last = keep & long[:, None] & (quarter == 3)
    assert m["drift/div_last_quarter"] == pytest.approx(per_token[last].mean().item(), rel=1e-5)


def test_missing_partial_view_is_a_clear_error():
    batch = logit_batch(0)
    r, s, t = batch.inputs()
    with pytest.raises(ValueError, match="full and partial views"):
        OBJECTIVES["anchored_residual"](r, s, t, ObjectiveConfig(name="anchored_residual"))
