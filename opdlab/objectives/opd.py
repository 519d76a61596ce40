"""Sampled-token on-policy distillation (METHODS.md section 0).

Per completion token, rkl_t = log pi_old(y_t) - log pi_T(y_t) and the advantage is A_t = -kappa * rkl_t, or with
a discount gamma > 0 the discounted sum of future per-token terms A_t = -kappa * sum_{t'>=t} gamma^(t'-t) rkl_t'.
The loss is the importance-sampling policy gradient

    L = - sum_t exp(log pi_theta(y_t) - log pi_old(y_t)) * A_t  /  (number of completion tokens)

whose gradient, in expectation over y ~ pi_theta (and pi_old = pi_theta), is the gradient of the per-token
reverse KL(pi_theta || pi_T). With `clip_eps` set, the ratio is PPO-clipped.
"""
from __future__ import annotations

import torch

from opdlab.config import ObjectiveConfig
from opdlab.types import ObjectiveOutput, Rollouts, StudentOutputs, TeacherScores


def discounted_future_sum(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """out_t = sum_{t' >= t} gamma^(t'-t) x_t' over masked positions (gamma = 0 returns x itself)."""
    x_B_T = x_B_T * mask_B_T
    if gamma == 0:
        return x_B_T
    out_B_T = torch.zeros_like(x_B_T)
    running_B = torch.zeros_like(x_B_T[:, 0])
    for t in range(x_B_T.shape[1] - 1, -1, -1):
        running_B = x_B_T[:, t] + gamma * running_B
        out_B_T[:, t] = running_B
    return out_B_T * mask_B_T


def sampled_token_opd(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
                      cfg: ObjectiveConfig) -> ObjectiveOutput:
    mask_B_T = rollouts.completion_mask_B_T.float()
    n_tokens = mask_B_T.sum().clamp(min=1.0)
    rkl_B_T = (rollouts.logp_old_B_T - teacher.logp_B_T) * mask_B_T
    advantage_B_T = -cfg.kl_coef * discounted_future_sum(rkl_B_T, mask_B_T, cfg.discount)
    ratio_B_T = torch.exp(student.logp_B_T - rollouts.logp_old_B_T) * mask_B_T
    objective_B_T = ratio_B_T * advantage_B_T
    if cfg.clip_eps is not None:
        clipped_B_T = ratio_B_T.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * advantage_B_T
        objective_B_T = torch.minimum(objective_B_T, clipped_B_T)
    loss = -(objective_B_T * mask_B_T).sum() / n_tokens
    with torch.no_grad():
        metrics = {
            "train/reverse_kl": (rkl_B_T.sum() / n_tokens).item(),
            "train/advantage": (advantage_B_T.sum() / n_tokens).item(),
            "train/neg_reward_frac": (((rkl_B_T > 0).float() * mask_B_T).sum() / n_tokens).item(),
            "train/ratio": (ratio_B_T.sum() / n_tokens).item(),
        }
    return ObjectiveOutput(loss=loss, metrics=metrics)
