"""Sampled-token on-policy distillation (docs/methods.md#sampled-token-opd).

Per completion token, rkl_t = log pi_old(y_t) - log pi_T(y_t) and the advantage is A_t = -kappa * rkl_t, or with
a discount gamma > 0 the discounted sum of future per-token terms A_t = -kappa * sum_{t'>=t} gamma^(t'-t) rkl_t'.
The loss is the importance-sampling policy gradient

    L = - sum_t exp(log pi_theta(y_t) - log pi_old(y_t)) * A_t  /  (number of completion tokens)

whose gradient, in expectation over y ~ pi_theta (and pi_old = pi_theta), is the gradient of the per-token
reverse KL(pi_theta || pi_T). With `clip_eps` set, the ratio is PPO-clipped. Sums and the token count run over
`Rollouts.loss_mask_B_T` (completion tokens minus masked special tokens).

With `objective.reward_weight` w > 0 the task reward joins the advantage, A_t = -kappa * rkl_t + w * A_i, where
A_i is rollout i's reward normalised within its prompt's group (GRPO; `Rollouts.reward_advantage_B`); with kappa = 0
the loss is then GRPO's token-level policy gradient, -sum_i A_i sum_t ratio_t / n. `train/reward_share` is
sum |w A_i| / (sum |teacher term| + sum |w A_i|) over loss tokens.

Diagnostics: those of `opdlab.objectives.common`; the support/* ones (S = the teacher's top-K from its scores) apply
the student's output layer to its detached hidden states chunk by chunk (no extra forward pass through the model).
"""
from __future__ import annotations

import torch

from opdlab.config import ObjectiveConfig
from opdlab.objectives.common import mean_stats, reward_share, reward_term, student_support_stats, to_floats, \
    token_metrics
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
    """Sampled-token OPD: importance-weighted policy gradient with advantage -kappa * (log pi_old - log pi_T)."""
    mask_B_T = rollouts.loss_mask_B_T.float()
    n_tokens = mask_B_T.sum().clamp(min=1.0)
    rkl_B_T = (rollouts.logp_old_B_T - teacher.logp_B_T) * mask_B_T
    advantage_B_T = -cfg.kl_coef * discounted_future_sum(rkl_B_T, mask_B_T, cfg.discount)
    reward_B_T = reward_term(rollouts, cfg, mask_B_T)
    if reward_B_T is not None:
        teacher_advantage_B_T, advantage_B_T = advantage_B_T, advantage_B_T + reward_B_T
    ratio_B_T = torch.exp(student.logp_B_T - rollouts.logp_old_B_T) * mask_B_T
    objective_B_T = ratio_B_T * advantage_B_T
    if cfg.clip_eps is not None:
        clipped_B_T = ratio_B_T.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * advantage_B_T
        objective_B_T = torch.minimum(objective_B_T, clipped_B_T)
    loss = -(objective_B_T * mask_B_T).sum() / n_tokens
    with torch.no_grad():
        loss_mask_B_T = mask_B_T.bool()
        metrics = {
            **token_metrics(rollouts, student, teacher),
            "train/advantage": (advantage_B_T.sum() / n_tokens),
            "train/ratio": (ratio_B_T.sum() / n_tokens),
            **mean_stats(student_support_stats(student, loss_mask_B_T, teacher,
                                               rollouts.completion_ids_B_T[loss_mask_B_T], cfg.support_k)),
        }
        if reward_B_T is not None:
            metrics["train/reward_share"] = reward_share(teacher_advantage_B_T, reward_B_T, mask_B_T)
    return ObjectiveOutput(loss=loss, metrics=to_floats(metrics))
