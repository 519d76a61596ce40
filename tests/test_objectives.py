"""Tests of sampled-token OPD (`opdlab.objectives.opd`) against independent computations: exact enumeration of
the sampled token on a small vocabulary, a Monte-Carlo average judged by its standard error, hand-written
discounted sums, and the PPO clipping rule written out case by case.

    python -m pytest tests/test_objectives.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from opdlab.config import ObjectiveConfig
from opdlab.objectives.opd import discounted_future_sum, sampled_token_opd
from opdlab.types import Problem, Rollouts, StudentOutputs, TeacherScores

V = 6


def make_batch(completion_ids, mask, logp_old, student_logp, teacher_logp):
    """Rollouts / StudentOutputs / TeacherScores holding just what the objective reads (B, T tensors)."""
    B, T = completion_ids.shape
    rollouts = Rollouts(
        prompt_ids_B_P=torch.zeros(B, 1, dtype=torch.long), prompt_mask_B_P=torch.ones(B, 1, dtype=torch.long),
        completion_ids_B_T=completion_ids, completion_mask_B_T=mask.long(), logp_old_B_T=logp_old,
        sampler_logp_B_T=logp_old.clone(), problems=[Problem(uid=str(i), question="q", answer="a") for i in range(B)],
        texts=[""] * B)
    student = StudentOutputs(logp_B_T=student_logp, entropy_B_T=torch.zeros(B, T, dtype=student_logp.dtype),
                             hidden_B_T_H=torch.zeros(B, T, 1), lm_head=torch.nn.Identity())
    teacher = TeacherScores(logp_B_T=teacher_logp, topk_ids_B_T_K=torch.zeros(B, T, 0, dtype=torch.long),
                            topk_logp_B_T_K=torch.zeros(B, T, 0), entropy_B_T=torch.zeros(B, T),
                            maxp_B_T=torch.zeros(B, T))
    return rollouts, student, teacher


def random_distributions(seed: int):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    teacher_logq = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    return z, teacher_logq


def exact_kl_and_grad(z, logq):
    """KL(softmax(z) || q) and its gradient w.r.t. z, straight from the two distributions."""
    z = z.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - logq)).sum()
    (grad,) = torch.autograd.grad(kl, z)
    return kl.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kl_coef", [1.0, 2.5])
def test_expectation_over_sampled_token_is_exact_reverse_kl(seed, kl_coef):
    z, logq = random_distributions(seed)
    cfg = ObjectiveConfig(kl_coef=kl_coef)
    pi = torch.softmax(z.detach(), -1)
    expected_loss = torch.zeros((), dtype=torch.float64)
    expected_grad = torch.zeros(V, dtype=torch.float64)
    for y in range(V):  # every token the student could sample, weighted by its probability
        logp_y = torch.log_softmax(z, -1)[y]
        rollouts, student, teacher = make_batch(
            torch.tensor([[y]]), torch.ones(1, 1), logp_y.detach().reshape(1, 1), logp_y.reshape(1, 1),
            logq[y].reshape(1, 1))
        loss = sampled_token_opd(rollouts, student, teacher, cfg).loss
        (grad,) = torch.autograd.grad(loss, z)
        expected_loss += pi[y] * loss.detach()
        expected_grad += pi[y] * grad
    kl, kl_grad = exact_kl_and_grad(z, logq)
    assert kl > 0.05  # the two distributions really differ
    torch.testing.assert_close(expected_loss, kl_coef * kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad, kl_coef * kl_grad, rtol=1e-9, atol=1e-12)


def test_monte_carlo_estimate_within_standard_error():
    z, logq = random_distributions(7)
    N = 20000
    g = torch.Generator().manual_seed(123)
    logp_all = torch.log_softmax(z, -1)
    ys = torch.multinomial(logp_all.detach().exp(), N, replacement=True, generator=g)
    logp_y = logp_all[ys]  # (N,), differentiable in z
    rollouts, student, teacher = make_batch(ys[:, None], torch.ones(N, 1), logp_y.detach()[:, None],
                                            logp_y[:, None], logq[ys][:, None])
    loss = sampled_token_opd(rollouts, student, teacher, ObjectiveConfig()).loss
    (grad,) = torch.autograd.grad(loss, z)
    kl, kl_grad = exact_kl_and_grad(z, logq)

    # Independent per-sample values: r_i = log pi(y_i) - log q(y_i); the per-sample gradient of r_i * log pi(y_i)
    # (the score-function estimator) w.r.t. z is r_i * (onehot(y_i) - pi).
    pi = logp_all.detach().exp()
    r = (logp_all.detach() - logq)[ys]
    per_grad = r[:, None] * (torch.nn.functional.one_hot(ys, V).double() - pi)
    se_loss = r.std() / math.sqrt(N)
    se_grad = per_grad.std(0) / math.sqrt(N)
    assert abs(loss.item() - kl.item()) < 4.5 * se_loss.item()
    assert torch.all((grad - kl_grad).abs() < 4.5 * se_grad + 1e-12), (grad, kl_grad, se_grad)
    # the tolerance is tight enough to mean something: far smaller than the quantities compared
    assert 4.5 * se_loss < 0.2 * kl and torch.all(4.5 * se_grad < 0.5 * kl_grad.abs().max())


# ---------------------------------------------------------------- discount


def hand_discounted(x, mask, gamma):
    """out[b][t] = sum over t' >= t with mask[b][t'] of gamma^(t'-t) * x[b][t'] (0 where mask[b][t] is 0)."""
    B, T = len(x), len(x[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                out[b][t] = sum(gamma ** (u - t) * x[b][u] for u in range(t, T) if mask[b][u])
    return torch.tensor(out, dtype=torch.float64)


def random_completion_mask(B, T, g):
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row
    return (torch.arange(T)[None, :] < lengths[:, None]).double()


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
def test_discounted_future_sum_matches_loop(gamma):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    for mask in (random_completion_mask(4, 7, g), (torch.rand(4, 7, generator=g) < 0.6).double()):  # also holes
        got = discounted_future_sum(x, mask, gamma)
        torch.testing.assert_close(got, hand_discounted(x.tolist(), mask.tolist(), gamma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_objective_advantage_is_discounted_future_reverse_kl(gamma):
    """With pi_theta = pi_old the gradient of the loss w.r.t. log pi_theta(y_t) is -A_t / n, so the objective's
    advantages can be read off the gradient and compared with a hand-written discounted sum."""
    g = torch.Generator().manual_seed(11)
    B, T, kappa = 3, 6, 1.7
    mask = random_completion_mask(B, T, g)
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    teacher_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    student_logp = logp_old.clone().requires_grad_(True)
    rollouts, student, teacher = make_batch(torch.zeros(B, T, dtype=torch.long), mask, logp_old, student_logp,
                                            teacher_logp)
    loss = sampled_token_opd(rollouts, student, teacher, ObjectiveConfig(kl_coef=kappa, discount=gamma)).loss
    (grad,) = torch.autograd.grad(loss, student_logp)
    n = mask.sum().item()
    rkl = (logp_old - teacher_logp).tolist()
    advantage = -kappa * hand_discounted(rkl, mask.tolist(), gamma)
    torch.testing.assert_close(-grad * n, advantage, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), -advantage.sum() / n, rtol=1e-10, atol=1e-12)
    if gamma == 0:  # per-token: A_t = -kappa * rkl_t exactly
        torch.testing.assert_close(-grad * n, -kappa * (logp_old - teacher_logp) * mask, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- normalisation and padding


def test_loss_is_normalised_by_total_completion_tokens_and_ignores_padding():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 5
    lengths = [5, 1, 3, 0]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    teacher_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    s_logp = logp_old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratio != 1

    def run(lo, tl, sl):
        sl = sl.clone().requires_grad_(True)
        r, s, t = make_batch(torch.zeros(B, T, dtype=torch.long), mask, lo, sl, tl)
        out = sampled_token_opd(r, s, t, ObjectiveConfig())
        (grad,) = torch.autograd.grad(out.loss, sl)
        return out, grad

    out, grad = run(logp_old, teacher_logp, s_logp)
    # independent: -sum over real tokens of ratio * (-(log pi_old - log pi_T)) / number of real tokens
    terms = [math.exp(s_logp[b, t] - logp_old[b, t]) * (logp_old[b, t] - teacher_logp[b, t]).item()
             for b in range(B) for t in range(lengths[b])]
    assert out.loss.item() == pytest.approx(sum(terms) / sum(lengths), rel=1e-12)
    seq_means = [sum(terms[sum(lengths[:b]):sum(lengths[:b + 1])]) / lengths[b] for b in range(B) if lengths[b]]
    assert abs(sum(seq_means) / len(seq_means) - out.loss.item()) > 1e-3  # token mean differs from sequence mean
    rkl = [(logp_old[b, t] - teacher_logp[b, t]).item() for b in range(B) for t in range(lengths[b])]
    assert out.metrics["train/reverse_kl"] == pytest.approx(sum(rkl) / sum(lengths), rel=1e-12)

    # values at padded positions do not matter, to the loss or to any gradient
    pad = mask == 0
    noise = lambda: 5 * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    out2, grad2 = run(torch.where(pad, noise(), logp_old), torch.where(pad, noise(), teacher_logp),
                      torch.where(pad, noise(), s_logp))
    assert out2.loss.item() == out.loss.item()
    assert torch.equal(grad2, grad)
    assert torch.all(grad[pad] == 0) and torch.all(grad[~pad] != 0)


def test_empty_batch_gives_zero_loss_not_nan():
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    r, s, t = make_batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64),
                         z, torch.zeros(2, 3, dtype=torch.float64))
    loss = sampled_token_opd(r, s, t, ObjectiveConfig()).loss
    assert loss.item() == 0.0


# ---------------------------------------------------------------- PPO clip


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_ppo_clip_zeroes_gradient_exactly_where_ppo_says(eps):
    ratios = [0.5, 1 - eps / 2, 1.0, 1 + eps / 2, 1.6]
    rkls = [-0.7, 0.7]  # rkl < 0: advantage > 0; rkl > 0: advantage < 0
    cells = [(r, k) for r in ratios for k in rkls]
    T = len(cells)
    logp_old = torch.full((1, T), -1.2, dtype=torch.float64)
    student_logp = (logp_old + torch.tensor([[math.log(r) for r, _ in cells]], dtype=torch.float64))
    student_logp.requires_grad_(True)
    teacher_logp = logp_old - torch.tensor([[k for _, k in cells]], dtype=torch.float64)
    r, s, t = make_batch(torch.zeros(1, T, dtype=torch.long), torch.ones(1, T), logp_old, student_logp, teacher_logp)
    loss = sampled_token_opd(r, s, t, ObjectiveConfig(clip_eps=eps)).loss
    (grad,) = torch.autograd.grad(loss, student_logp)
    expected_loss = 0.0
    for i, (ratio, rkl) in enumerate(cells):
        adv = -rkl
        clipped = min(max(ratio, 1 - eps), 1 + eps)
        expected_loss -= min(ratio * adv, clipped * adv) / T
        no_grad = (adv > 0 and ratio > 1 + eps) or (adv < 0 and ratio < 1 - eps)
        if no_grad:
            assert grad[0, i].item() == 0.0, (ratio, adv)
        else:  # d/dlogp of -(ratio * A)/T = -(ratio * A)/T
            assert grad[0, i].item() == pytest.approx(-ratio * adv / T, rel=1e-9), (ratio, adv)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    # without clipping nothing is zeroed
    student_logp2 = student_logp.detach().clone().requires_grad_(True)
    r, s, t = make_batch(torch.zeros(1, T, dtype=torch.long), torch.ones(1, T), logp_old, student_logp2, teacher_logp)
    (grad2,) = torch.autograd.grad(sampled_token_opd(r, s, t, ObjectiveConfig()).loss, student_logp2)
    assert torch.all(grad2 != 0)
