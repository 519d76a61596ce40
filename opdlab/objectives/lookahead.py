"""The lookahead objective: Lookahead Group Reward (LGR), docs/methods.md#lookahead-group-reward-lgr.

On student-generated prefixes the teacher's confidence decays, and with it the reverse-KL signal of sampled-token
OPD. LGR adds a reward that looks one step ahead. At the trigger positions S = {t : H(pi_theta(. | c_t)) > tau}
(the student's entropy, loss positions only) the student's top-K tokens v_1..v_K are the candidates; candidate k's
raw reward is the teacher's confidence after it, by default r(k) = max_v pi_T(v | x, y_<t, v_k) (other signals:
`opdlab.teacher.tree_attention.confidence_reward`); rewards are normalised within each group of K,

    r~(k) = (r(k) - mean_k r) / (std_k r + eps),   std over the K candidates (1/K, not 1/(K-1)) [R], eps = 1e-6.

(`objective.lookahead.norm` = 'std', the paper's form). Near-identical rewards (a teacher almost certain one step
ahead whichever candidate comes) then become +-1 bonuses carrying noise, so two floored forms [R] are options:
'floor' divides by max(std_k r, f), 'gate' keeps the paper's form where std_k r >= f and gives no bonus below it
(f = objective.lookahead.std_floor).

Forms (`objective.lookahead.form`):

    sampled (default)  A_t = -kappa * rkl_t + gamma * 1[t in S] * r~(y_t), the sampled token's own normalised
                       reward; no bonus when y_t is not among the K candidates [R: the paper leaves the sign and
                       this case open]. The loss is OPD's importance-sampling policy gradient with this advantage,
                       L = -sum_t ratio_t * A_t / n (PPO clip with objective.clip_eps).
    topk               A_t = -kappa * rkl_t (plain OPD), plus at every t in S a policy-gradient term over all K
                       candidates, -gamma * sum_k sg(r~(k)) * log pi_theta(v_k | c_t), divided by the same n [R: the
                       candidate term replaces the sampled-token bonus, so y_t is not rewarded twice].

rkl_t = log pi_old(y_t) - log pi_T(y_t), optionally summed with objective.discount (as in `opd`); kappa =
objective.kl_coef, gamma = objective.lookahead.gamma, n = the batch's loss tokens. Defaults K = 8, tau = 0.2,
gamma = 1 (the paper: large gamma, e.g. 10, lets the student game the reward with repeated tokens). The task-reward
term of `objective.reward_weight` is added to A_t as in `opd`.

The candidates and their rewards are teacher work: the table entry's `teacher_request` asks
`opdlab.teacher.scoring.score` for them (`TeacherRequest.lookahead`), which runs the student once without gradients to
pick S and the candidates and scores all of them with tree attention in the teacher's scoring passes. Top-p rollouts and
special-token masking compose as for `opd`: the candidates come from the student's untruncated distribution, and masked
tokens are neither in the loss nor in S.

Diagnostics (besides those of `opd`), per step:

    lookahead/trigger_rate           |S| / L: trigger positions per loss token
    lookahead/reward_mean, _std      mean and std of the raw candidate rewards r(k) over all candidates in S
    lookahead/group_std              mean over S of the within-group std (the normaliser)
    lookahead/sampled_in_candidates  fraction of trigger positions whose sampled token is among the K candidates
    lookahead/sampled_norm_reward    mean r~(y_t) over those positions (> 0: the student samples good candidates)
    lookahead/bonus_share            sum |gamma * bonus| / (sum |OPD advantage| + sum |gamma * bonus|) over loss
                                     tokens; the bonus is gamma * r~(y_t) (sampled) or gamma * sum_k |r~(k)| (topk)

[R] marks a reconstruction: a detail the source paper's text leaves open, chosen here and explained in
docs/methods.md#reconstructions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.objectives.common import logits_of, mean_stats, reward_share, reward_term, run_chunks, \
    student_support_stats, to_floats, token_metrics
from opdlab.objectives.opd import discounted_future_sum
from opdlab.types import LookaheadRequest, ObjectiveOutput, Rollouts, StudentOutputs, TeacherRequest, TeacherScores

EPS = 1e-6


def lookahead_teacher_request(cfg: ObjectiveConfig) -> TeacherRequest:
    """Candidate rewards (and the teacher's top-K for the support/* diagnostics, as for opd)."""
    return TeacherRequest(top_k=cfg.support_k, lookahead=LookaheadRequest(
        k=cfg.lookahead.k, tau=cfg.lookahead.tau, signal=cfg.lookahead.signal, segment_len=cfg.lookahead.segment))


NORMS = ("std", "floor", "gate")


def group_normalise(reward_B_T_K: torch.Tensor, trigger_B_T: torch.Tensor, eps: float = EPS, norm: str = "std",
                    floor: float = 0.0) -> torch.Tensor:
    """The group-normalised rewards within each position's K candidates, zero where there is no trigger: 'std'
    (r - mean_k r) / (std_k r + eps); 'floor' (r - mean_k r) / max(std_k r, floor); 'gate' the 'std' form where
    std_k r >= floor, zero below."""
    if norm not in NORMS:
        raise ValueError(f"unknown group normalisation {norm!r}; allowed: {', '.join(NORMS)}")
    mean_B_T_1 = reward_B_T_K.mean(-1, keepdim=True)
    std_B_T_1 = reward_B_T_K.std(-1, correction=0, keepdim=True)
    centred_B_T_K = (reward_B_T_K - mean_B_T_1) * trigger_B_T[..., None]
    if norm == "floor":
        return centred_B_T_K / std_B_T_1.clamp(min=max(floor, eps))
    out_B_T_K = centred_B_T_K / (std_B_T_1 + eps)
    return out_B_T_K * (std_B_T_1 >= floor) if norm == "gate" else out_B_T_K


def _mean_where(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum / count, NaN (left out of the step's metrics) when count is 0."""
    return torch.where(count > 0, values.sum() / count.clamp(min=1), torch.full_like(count, math.nan))


def lookahead(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
              cfg: ObjectiveConfig) -> ObjectiveOutput:
    """LGR: sampled-token OPD plus gamma * the group-normalised lookahead reward of the student's top-K candidates
    at its high-entropy positions (objective.lookahead_*)."""
    if teacher.lookahead_reward_B_T_K is None:
        raise ValueError("the lookahead objective needs candidate rewards in the teacher's scores: "
                         "score(..., lookahead=LookaheadRequest(...), student=student) (its table entry's "
                         "teacher_request asks the training loop for them)")
    mask_B_T = rollouts.loss_mask_B_T.float()
    n_tokens = mask_B_T.sum().clamp(min=1.0)
    y_B_T = rollouts.completion_ids_B_T
    trigger_B_T = teacher.lookahead_trigger_B_T.bool() & rollouts.loss_mask_B_T.bool()
    ids_B_T_K, raw_B_T_K = teacher.lookahead_ids_B_T_K, teacher.lookahead_reward_B_T_K.float()
    norm_B_T_K = group_normalise(raw_B_T_K, trigger_B_T, norm=cfg.lookahead.norm, floor=cfg.lookahead.std_floor)
    is_sampled_B_T_K = (ids_B_T_K == y_B_T[..., None]) & trigger_B_T[..., None]
    gamma = cfg.lookahead.gamma

    rkl_B_T = (rollouts.logp_old_B_T - teacher.logp_B_T) * mask_B_T
    opd_advantage_B_T = -cfg.kl_coef * discounted_future_sum(rkl_B_T, mask_B_T, cfg.discount)
    if cfg.lookahead.form == "sampled":
        bonus_B_T = gamma * (norm_B_T_K * is_sampled_B_T_K).sum(-1)  # 0 when y_t is not a candidate
        advantage_B_T = opd_advantage_B_T + bonus_B_T
        bonus_size_B_T = bonus_B_T.abs()
    else:  # topk: the sampled token keeps the OPD advantage; the candidates get their own term below
        advantage_B_T = opd_advantage_B_T
        bonus_size_B_T = gamma * norm_B_T_K.abs().sum(-1)
    reward_B_T = reward_term(rollouts, cfg, mask_B_T)  # the task-reward term (objective.reward_weight)
    if reward_B_T is not None:
        advantage_B_T = advantage_B_T + reward_B_T
    ratio_B_T = torch.exp(student.logp_B_T - rollouts.logp_old_B_T) * mask_B_T
    objective_B_T = ratio_B_T * advantage_B_T
    if cfg.clip_eps is not None:
        clipped_B_T = ratio_B_T.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * advantage_B_T
        objective_B_T = torch.minimum(objective_B_T, clipped_B_T)
    loss_sum = -(objective_B_T * mask_B_T).sum()

    if cfg.lookahead.form == "topk" and trigger_B_T.any():
        def chunk(h_C_H, ids_C_K, norm_C_K):
            logp_C_K = F.log_softmax(logits_of(student, h_C_H), dim=-1).gather(-1, ids_C_K)
            return -(norm_C_K * logp_C_K).sum(-1), {}

        candidates_sum, _ = run_chunks(chunk, student.chunk_size, student.hidden_B_T_H[trigger_B_T],
                                       ids_B_T_K[trigger_B_T], norm_B_T_K[trigger_B_T],
                                       params=student.lm_head.parameters())
        loss_sum = loss_sum + gamma * candidates_sum

    with torch.no_grad():
        n_trigger = trigger_B_T.sum().float()
        raw_S_K = raw_B_T_K[trigger_B_T]
        in_candidates_B_T = is_sampled_B_T_K.any(-1)
        n_in = in_candidates_B_T.sum().float()
        opd_size = (opd_advantage_B_T.abs() * mask_B_T).sum()
        bonus_size = (bonus_size_B_T * mask_B_T).sum()
        loss_mask_B_T = mask_B_T.bool()
        metrics = {
            **token_metrics(rollouts, student, teacher),
            "train/advantage": advantage_B_T.sum() / n_tokens,
            "train/ratio": ratio_B_T.sum() / n_tokens,
            "lookahead/trigger_rate": n_trigger / n_tokens,
            "lookahead/reward_mean": _mean_where(raw_S_K, n_trigger * raw_S_K.shape[-1]),
            "lookahead/reward_std": raw_S_K.std(correction=0) if raw_S_K.numel() else n_trigger.new_tensor(math.nan),
            "lookahead/group_std": _mean_where(raw_S_K.std(-1, correction=0) if raw_S_K.numel() else raw_S_K,
                                               n_trigger),
            "lookahead/sampled_in_candidates": _mean_where(in_candidates_B_T.float(), n_trigger),
            "lookahead/sampled_norm_reward": _mean_where((norm_B_T_K * is_sampled_B_T_K).sum(-1), n_in),
            "lookahead/bonus_share": bonus_size / (opd_size + bonus_size).clamp(min=1e-12),
            **mean_stats(student_support_stats(student, loss_mask_B_T, teacher, y_B_T[loss_mask_B_T], cfg.support_k)),
        }
        if reward_B_T is not None:
            metrics["train/reward_share"] = reward_share(advantage_B_T - reward_B_T, reward_B_T, mask_B_T)
    return ObjectiveOutput(loss=loss_sum / n_tokens, metrics=to_floats(metrics))
