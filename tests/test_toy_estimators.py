"""The γ-interpolated OPD estimator of the toy study against independent computations, and a quick run of the study.

The reference gradients are built without `gamma_surrogate_loss` or `discounted_future_sum`: one autograd call per
sampled step gives s_t = ∇ log π_θ(y_t|c_t), and the weights Σ_{t'≥t} γ^{t'−t} r_t' are summed in Python
loops.
"""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from opdlab.experiments.toy.estimators import (GaussianPolicy, ToyConfig, discounted_future_sum, gamma_surrogate_loss,
                                               main, rollout)

torch.set_num_threads(1)
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def flat_grad(scalar, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params, retain_graph=True)])


def tiny_case(seed: int = 0, B: int = 3, T: int = 5):
    """A small float64 Gaussian policy, a different 'teacher', some of their trajectories and a ragged mask."""
    cfg = ToyConfig(hidden=8, horizon=T)
    torch.manual_seed(seed)
    student, teacher = GaussianPolicy(cfg).double(), GaussianPolicy(cfg).double()
    sign_B, states_B_T, actions_B_T = rollout(student, B, T, torch.Generator().manual_seed(seed))
    student_logp_B_T = student.log_prob(sign_B, states_B_T, actions_B_T)
    with torch.no_grad():
        teacher_logp_B_T = teacher.log_prob(sign_B, states_B_T, actions_B_T)
    lengths = [T, T - 2, 1][:B] + [T] * max(0, B - 3)
    mask_B_T = torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=torch.float64)
    return student, student_logp_B_T, teacher_logp_B_T, mask_B_T


def reference_gradient(params, student_logp_B_T, teacher_logp_B_T, mask_B_T, gamma) -> torch.Tensor:
    """(1/B) Σ_b Σ_t m_t (Σ_{t'≥t} γ^{t'−t} m_t' r_t') s_t, with each s_t from its own autograd call."""
    B, T = student_logp_B_T.shape
    total = 0.0
    for b in range(B):
        r = [(student_logp_B_T[b, t] - teacher_logp_B_T[b, t]).item() * mask_B_T[b, t].item() for t in range(T)]
        for t in range(T):
            if mask_B_T[b, t] == 0:
                continue
            weight = sum(gamma ** (u - t) * r[u] for u in range(t, T))  # Python: 0.0 ** 0 == 1.0
            total = total + weight * flat_grad(student_logp_B_T[b, t], params)
    return total / B


def test_discounted_future_sum_matches_loops_and_limits():
    r_B_T = torch.randn(4, 7, dtype=torch.float64)
    for gamma in GAMMAS:
        expected = [[sum(gamma ** (u - t) * r_B_T[b, u].item() for u in range(t, 7)) for t in range(7)]
                    for b in range(4)]
        torch.testing.assert_close(discounted_future_sum(r_B_T, gamma), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(discounted_future_sum(r_B_T, 0.0), r_B_T)
    torch.testing.assert_close(discounted_future_sum(r_B_T, 1.0), r_B_T.flip(-1).cumsum(-1).flip(-1))


@pytest.mark.parametrize("gamma", GAMMAS)
def test_surrogate_gradient_equals_summed_score_functions(gamma):
    student, student_logp_B_T, teacher_logp_B_T, mask_B_T = tiny_case()
    params = list(student.parameters())
    loss = gamma_surrogate_loss(student_logp_B_T, teacher_logp_B_T, mask_B_T, gamma)
    expected = reference_gradient(params, student_logp_B_T, teacher_logp_B_T, mask_B_T, gamma)
    torch.testing.assert_close(flat_grad(loss, params), expected, rtol=1e-9, atol=1e-12)


def test_token_and_sequence_level_limits():
    """γ = 0 is Σ_t r_t s_t and γ = 1 is Σ_t (Σ_{t'≥t} r_t') s_t, written out without any γ."""
    student, student_logp_B_T, teacher_logp_B_T, mask_B_T = tiny_case(seed=1, B=2, T=4)
    mask_B_T = torch.ones_like(mask_B_T)
    params = list(student.parameters())
    r_B_T = (student_logp_B_T - teacher_logp_B_T).detach()
    s = [[flat_grad(student_logp_B_T[b, t], params) for t in range(4)] for b in range(2)]
    token = sum(r_B_T[b, t] * s[b][t] for b in range(2) for t in range(4)) / 2
    sequence = sum(r_B_T[b, t:].sum() * s[b][t] for b in range(2) for t in range(4)) / 2
    for gamma, expected in ((0.0, token), (1.0, sequence)):
        loss = gamma_surrogate_loss(student_logp_B_T, teacher_logp_B_T, mask_B_T, gamma)
        torch.testing.assert_close(flat_grad(loss, params), expected, rtol=1e-9, atol=1e-12)


def test_zero_gradient_when_teacher_equals_student_and_gamma_irrelevant_at_one_step():
    student, student_logp_B_T, _, mask_B_T = tiny_case(seed=2)
    params = list(student.parameters())
    for gamma in GAMMAS:
        loss = gamma_surrogate_loss(student_logp_B_T, student_logp_B_T.detach(), mask_B_T, gamma)
        assert flat_grad(loss, params).abs().max() == 0
    student, student_logp_B_T, teacher_logp_B_T, mask_B_T = tiny_case(seed=3, T=1)
    params = list(student.parameters())
    grads = [flat_grad(gamma_surrogate_loss(student_logp_B_T, teacher_logp_B_T, mask_B_T, g), params)
             for g in GAMMAS]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_sequence_level_is_unbiased_token_level_is_not():
    """Exact expectation over all 3² sequences of a 2-step categorical policy whose second step sees y_1:
    E[ĝ_1] = ∇ KL(π_θ ‖ q) over sequences; E[ĝ_0] misses the effect of y_1 on the second step's KL."""
    torch.manual_seed(0)
    V = 3
    theta = torch.randn(1 + V, V, dtype=torch.float64, requires_grad=True)  # row 0: step 1; row 1+y1: step 2
    q_logits = torch.randn(1 + V, V, dtype=torch.float64)

    def step_logps(logits, y1, y2):
        return torch.stack([logits[0].log_softmax(-1)[y1], logits[1 + y1].log_softmax(-1)[y2]])  # (T=2,)

    sequences = list(itertools.product(range(V), repeat=2))
    logp_S_T = torch.stack([step_logps(theta, *y) for y in sequences])
    q_logp_S_T = torch.stack([step_logps(q_logits, *y) for y in sequences])
    prob_S = logp_S_T.sum(-1).exp()
    exact_kl = (prob_S * (logp_S_T.sum(-1) - q_logp_S_T.sum(-1))).sum()
    true_grad = flat_grad(exact_kl, [theta])

    def expected_estimate(gamma):  # Σ_y p(y) ĝ_γ(y), one single-sequence surrogate per y
        losses = [gamma_surrogate_loss(logp_S_T[i:i + 1], q_logp_S_T[i:i + 1], torch.ones(1, 2), gamma)
                  for i in range(len(sequences))]
        return sum(p.item() * flat_grad(loss, [theta]) for p, loss in zip(prob_S, losses))

    torch.testing.assert_close(expected_estimate(1.0), true_grad, rtol=1e-9, atol=1e-12)
    bias = (expected_estimate(0.0) - true_grad).norm() / true_grad.norm()
    assert bias > 0.05, f"token-level estimator unexpectedly unbiased here (relative bias {bias:.3g})"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gammas"):
        ToyConfig(gammas=(0.0, 1.5))
    with pytest.raises(ValueError, match="micro_batches"):
        ToyConfig(micro_batches=1)
    with pytest.raises(ValueError, match="even"):
        ToyConfig(batch_size=63)


def test_quick_study_writes_table_json_and_png(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "grad variance" in printed and "final KL" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["gamma"] for row in results["summary"]] == [0.0, 1.0]
    for row in results["summary"]:
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            assert all(math.isfinite(v) for v in values), (key, value)
        assert row["grad_var"][0] > 0
    for run in results["runs"]:
        assert all(math.isfinite(c[k]) for c in run["checkpoints"] for k in ("grad_var", "kl", "distance"))
    png = tmp_path / "estimators.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_gamma_outside_unit_interval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--gammas", "0", "1.5"])
    assert exit_info.value.code == 2 and "gammas" in capsys.readouterr().err
