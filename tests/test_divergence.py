"""Tests of the full-vocabulary objectives (`opdlab.objectives.divergence`: forward_kl = KL(pi_T || pi_theta),
reverse_kl = KL(pi_theta || pi_T), jsd = JSD_beta) against direct float64 computations on a small vocabulary, the
beta limits, zero loss for identical models, chunked == unchunked (loss and gradients), and the diagnostics.

    python -m pytest tests/test_divergence.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from logit_batches import logit_batch
from opdlab.config import ObjectiveConfig
from opdlab.objectives import OBJECTIVES
from opdlab.objectives.divergence import generalized_jsd
from opdlab.types import Problem, Rollouts, StudentOutputs, TeacherScores

torch.set_num_threads(1)


def direct_per_token(z, zt, name, beta, tau):
    """(B, T) float64 per-token divergence straight from the definitions: KL via torch.distributions, JSD from
    its mixture written out."""
    p = Categorical(logits=z.double() / tau)
    q = Categorical(logits=zt.double() / tau)
    if name == "forward_kl":
        return kl_divergence(q, p)  # KL(pi_T || pi_theta)
    if name == "reverse_kl":
        return kl_divergence(p, q)  # KL(pi_theta || pi_T)
    m = Categorical(probs=beta * q.probs + (1 - beta) * p.probs)
    return beta * kl_divergence(q, m) + (1 - beta) * kl_divergence(p, m)


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9)]


@pytest.mark.parametrize("name, beta", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_divergence_matches_direct_computation(name, beta, tau):
    batch = logit_batch(seed=CASES.index((name, beta)) + int(10 * tau))
    r, s, t = batch.inputs(chunk_size=4)
    out = OBJECTIVES[name](r, s, t, ObjectiveConfig(name=name, divergence={"beta": beta, "temperature": tau}))
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)

    z64 = batch.z_B_T_V.detach().double().requires_grad_(True)
    m = batch.mask_B_T.bool()
    per_token = direct_per_token(z64, batch.zt_B_T_V, name, beta, tau)
    expected = per_token[m].sum() / m.sum()
    (expected_grad,) = torch.autograd.grad(expected, z64)
    assert expected > 0.05  # the models really differ
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[~m] == 0) and torch.all(grad[m].abs().sum(-1) > 0)  # padding gets no gradient


def test_beta_endpoints_are_the_two_kls_exactly():
    batch = logit_batch(seed=3)
    r, s, t = batch.inputs()
    cfg = lambda name, beta=0.5: ObjectiveConfig(name=name, divergence={"beta": beta})  # noqa: E731
    jsd0 = OBJECTIVES["jsd"](r, s, t, cfg("jsd", 0.0)).loss
    jsd1 = OBJECTIVES["jsd"](r, s, t, cfg("jsd", 1.0)).loss
    fkl = OBJECTIVES["forward_kl"](r, s, t, cfg("forward_kl")).loss
    rkl = OBJECTIVES["reverse_kl"](r, s, t, cfg("reverse_kl")).loss
    assert torch.equal(jsd0, fkl) and torch.equal(jsd1, rkl)
    assert abs(fkl.item() - rkl.item()) > 0.05  # and the two directions really differ here


def test_beta_limits_numerically():
    """JSD_beta / beta -> KL(pi_T || pi_theta) as beta -> 0 and JSD_beta / (1 - beta) -> KL(pi_theta || pi_T) as
    beta -> 1, with an error that shrinks in proportion to the distance to the end (float64, values and gradients)."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    logq = F.log_softmax(torch.randn(4, 9, generator=g, dtype=torch.float64) * 2, -1)

    def value_and_grad(beta, scale):
        v = (generalized_jsd(F.log_softmax(z, -1), logq, beta) / scale).sum()
        return v.detach(), torch.autograd.grad(v, z)[0]

    for end, limit in ((0.0, 0.0), (1.0, 1.0)):
        target, target_grad = value_and_grad(limit, 1.0)
        errors, grad_errors = [], []
        for eps in (1e-4, 1e-5, 1e-6):
            beta = eps if end == 0 else 1 - eps
            v, grad = value_and_grad(beta, eps)
            errors.append(((v - target).abs() / target).item())
            grad_errors.append(((grad - target_grad).abs().max() / target_grad.abs().max()).item())
        for e in (errors, grad_errors):  # O(eps) convergence
            assert e[-1] < 1e-4 and e[0] / e[-1] > 50, e


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_give_zero_loss_and_gradient(name):
    batch = logit_batch(seed=5)
    batch.zt_B_T_V = batch.z_B_T_V.detach().clone()
    r, s, t = batch.inputs()
    out = OBJECTIVES[name](r, s, t, ObjectiveConfig(name=name, divergence={"temperature": 0.8}))
    (grad,) = torch.autograd.grad(out.loss, batch.z_B_T_V)
    assert abs(out.loss.item()) < 1e-6
    assert grad.abs().max() < 1e-6
    assert out.metrics["support/topk_overlap"] == 1.0


# ---------------------------------------------------------------- chunked == unchunked


def linear_head_inputs(name, seed, B=3, T=7, H=8, V=50):
    """Real output layers (nn.Linear, V > H) over random hidden states, so gradients reach the weights too."""
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, V, bias=False)
    teacher_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, H, generator=g))
        teacher_head.weight.copy_(torch.randn(V, H, generator=g) * 1.5)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    teacher_hidden = torch.randn(B, T, H, generator=g)
    lengths = [T, 3, 5]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        ids = torch.multinomial(student_head(hidden).softmax(-1).reshape(-1, V), 1, generator=g).reshape(B, T)
    return student_head, teacher_head, hidden, teacher_hidden, ids, mask


def run_objective(name, cfg, chunk_size, student_head, teacher_head, hidden, teacher_hidden, ids, mask):
    B, T, _ = hidden.shape
    V = student_head.weight.shape[0]
    logp_B_T_V = F.log_softmax(student_head(hidden), -1)
    with torch.no_grad():
        logq_B_T_V = F.log_softmax(teacher_head(teacher_hidden), -1)
        topk_logp, topk_ids = logq_B_T_V.topk(cfg.support_k, dim=-1)
    logp_B_T = logp_B_T_V.gather(-1, ids[..., None]).squeeze(-1)
    rollouts = Rollouts(
        prompt_ids_B_P=torch.zeros(B, 1, dtype=torch.long), prompt_mask_B_P=torch.ones(B, 1, dtype=torch.long),
        completion_ids_B_T=ids, completion_mask_B_T=mask, logp_old_B_T=logp_B_T.detach() * mask,
        sampler_logp_B_T=logp_B_T.detach() * mask, problems=[Problem(uid="0", question="q", answer="a")] * B,
        texts=[""] * B)
    student = StudentOutputs(logp_B_T=logp_B_T * mask, entropy_B_T=torch.zeros(B, T), hidden_B_T_H=hidden,
                             lm_head=student_head, vocab_size=V, chunk_size=chunk_size)
    teacher = TeacherScores(
        logp_B_T=logq_B_T_V.gather(-1, ids[..., None]).squeeze(-1) * mask, topk_ids_B_T_K=topk_ids,
        topk_logp_B_T_K=topk_logp, entropy_B_T=torch.zeros(B, T), maxp_B_T=torch.zeros(B, T),
        hidden_B_T_H=teacher_hidden, lm_head=teacher_head, vocab_size=V)
    out = OBJECTIVES[name](rollouts, student, teacher, cfg)
    student_head.weight.grad = None
    hidden.grad = None
    out.loss.backward()
    return out, hidden.grad.clone(), student_head.weight.grad.clone()


def unchunked_reference(name, cfg, student_head, teacher_head, hidden, teacher_hidden, ids, mask):
    """The same losses over materialised (B, T, V) fp32 logits, written out here."""
    m = mask.bool()
    tau = 1.0 if name == "lsm" else cfg.divergence.temperature  # lsm has no temperature
    logp = F.log_softmax(student_head(hidden) / tau, -1)[m]
    with torch.no_grad():
        logq = F.log_softmax(teacher_head(teacher_hidden) / tau, -1)[m]
    p, q = logp.exp(), logq.exp()
    if name == "forward_kl":
        per = (q * (logq - logp)).sum(-1)
    elif name == "reverse_kl":
        per = (p * (logp - logq)).sum(-1)
    elif name == "jsd":
        log_mix = torch.log(cfg.divergence.beta * q + (1 - cfg.divergence.beta) * p)
        per = (cfg.divergence.beta * (q * (logq - log_mix)).sum(-1)
               + (1 - cfg.divergence.beta) * (p * (logp - log_mix)).sum(-1))
    else:  # lsm, support teacher_topk: both renormalised on the teacher's top-K
        S = logq.topk(cfg.support_k, -1).indices
        lp_hat = F.log_softmax(student_head(hidden)[m].gather(-1, S), -1)
        lq_hat = F.log_softmax(logq.gather(-1, S), -1)
        per = (lp_hat.exp() * (lp_hat - lq_hat)).sum(-1)
    loss = per.sum() / m.sum()
    student_head.weight.grad = None
    hidden.grad = None
    loss.backward()
    return loss.detach(), hidden.grad.clone(), student_head.weight.grad.clone()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "lsm"])
def test_chunked_equals_unchunked_loss_and_gradients(name):
    cfg = ObjectiveConfig(name=name, support_k=6, divergence={"beta": 0.3, "temperature": 0.9})
    args = linear_head_inputs(name, seed=1)
    ref_loss, ref_grad_h, ref_grad_w = unchunked_reference(name, cfg, *args)
    assert ref_grad_w.abs().max() > 1e-3
    for chunk_size in (1, 3, 4, 1000):
        out, grad_h, grad_w = run_objective(name, cfg, chunk_size, *args)
        tol = dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.loss.detach(), ref_loss, **tol, msg=f"chunk {chunk_size}")
        torch.testing.assert_close(grad_h, ref_grad_h, **tol, msg=f"chunk {chunk_size}")
        torch.testing.assert_close(grad_w, ref_grad_w, **tol, msg=f"chunk {chunk_size}")


# ---------------------------------------------------------------- diagnostics and errors


@pytest.mark.parametrize("name, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_diagnostics_match_direct_computation(name, beta):
    """Both KL directions are logged whichever the loss is (at beta 0 / 1 one is the loss itself)."""
    batch = logit_batch(seed=9, V=17)
    K = 4
    r, s, t = batch.inputs()
    out = OBJECTIVES[name](r, s, t, ObjectiveConfig(name=name, support_k=K, divergence={"beta": beta}))
    m = batch.mask_B_T.bool()
    logp = F.log_softmax(batch.z_B_T_V.detach().double(), -1)[m]
    logq = F.log_softmax(batch.zt_B_T_V.double(), -1)[m]
    ids = batch.ids_B_T[m]
    teacher_mass, student_mass, overlap, inside = [], [], [], []
    for i in range(len(ids)):
        S = set(logq[i].topk(K).indices.tolist())
        S_student = set(logp[i].topk(K).indices.tolist())
        teacher_mass.append(sum(logq[i, v].exp().item() for v in S))
        student_mass.append(sum(logp[i, v].exp().item() for v in S))
        overlap.append(len(S & S_student) / K)
        inside.append(float(ids[i].item() in S))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = {
        "support/teacher_mass": mean(teacher_mass), "support/student_mass": mean(student_mass),
        "support/topk_overlap": mean(overlap), "support/sampled_in_topk": mean(inside), "support/size": K,
        "div/kl_teacher_student": mean((logq.exp() * (logq - logp)).sum(-1).tolist()),
        "div/kl_student_teacher": mean((logp.exp() * (logp - logq)).sum(-1).tolist()),
        "train/neg_reward_frac": mean([float(logq[i, ids[i]] < logp[i, ids[i]]) for i in range(len(ids))]),
        "gap/pos_0_32": mean([(logq[i, ids[i]] - logp[i, ids[i]]).item() for i in range(len(ids))]),
    }
    for key, value in expected.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < expected["support/topk_overlap"] < 1 and 0 < expected["train/neg_reward_frac"] < 1
    assert "gap/pos_32_128" not in out.metrics  # no tokens there: left out, not 0 or NaN
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_needs_teacher_hidden_states():
    r, s, t = logit_batch(seed=0).inputs(keep_hidden=False)
    with pytest.raises(ValueError, match="keep_hidden=True"):
        OBJECTIVES["reverse_kl"](r, s, t, ObjectiveConfig(name="reverse_kl"))
    for name in ("forward_kl", "reverse_kl", "jsd"):
        request = OBJECTIVES[name].teacher_request(ObjectiveConfig(name=name))
        assert request.hidden and request.top_k == 0
