"""Privileged on-policy distillation and its Anchored Residual target (AR-OPD),
docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd.

The teacher scores each rollout twice, in one forward (`opdlab.teacher.views.score_views`): under the full view of the
oracle trace, q_F = pi_T(. | x + full trace, y_<t), and under the partial view, q_P = pi_T(. | x + partial trace,
y_<t). The objectives differ only in the target distribution q they pull the student towards:

    privileged_full      q = q_F
    privileged_partial   q = q_P
    anchored_residual    log q_AR = log_softmax(log q_P + lambda * clip(log q_F - log q_P, -c, c))

(lambda = `objective.anchored_residual.lambda`, default 0.8; c = `objective.anchored_residual.clip`, default 5). The
per-token loss is a divergence between q and pi_theta over the whole vocabulary, `objective.privileged.divergence`:

    kl_target_student   KL(q || pi_theta) = sum_v q(v) (log q(v) - log pi_theta(v))       (default)
    kl_student_target   KL(pi_theta || q) = sum_v pi_theta(v) (log pi_theta(v) - log q(v))
    jsd                 JSD_beta(q, pi_theta), beta = `objective.divergence.beta` (q in the teacher's place)

With `objective.privileged.top_k` = K > 0 the divergence is taken on S = TopK(q) only, both distributions renormalised
on S (a softmax over the in-support log-probs; tokens outside S get no gradient), as in lsm. The first
`objective.privileged.skip_first` completion tokens (default 3) are left out; the loss is the sum over the remaining
loss tokens divided by their number. q is a constant (the teacher has no gradient).

Memory: as the full-vocabulary divergences, the logits of the student and of both teacher views are made
`student.chunk_size` positions at a time and each chunk's gradient is taken before the next
(`opdlab.objectives.common.run_chunks`); nothing of size (B, T, V) exists.

Diagnostics (means over the loss tokens):

    priv/belief_shift         KL(q_F || q_P): how much the rest of the trace moves the teacher
    priv/kl_student_partial   KL(pi_theta || q_P);  priv/kl_student_full: KL(pi_theta || q_F)
    priv/uptake               KL(pi_theta || q_P) - KL(pi_theta || q_F): how far the student has moved towards
                              what only the full trace says; priv/uptake_ratio = uptake / belief_shift
    priv/top16_overlap        |Top16(pi_theta) ∩ Top16(q)| / 16;  priv/top16_overlap_views: of q_F and q_P
    priv/entropy_full, priv/entropy_partial, priv/entropy_target   teacher entropies H(q_F), H(q_P), H(q)
    div/target                the loss's per-token divergence
    drift/div_first_quarter, drift/div_last_quarter   div/target over the first and the last quarter of the
                              positions of long rollouts (completion at least the batch's median length)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.objectives.common import logits_of, mean_stats, run_chunks, to_floats, token_metrics, zero_loss
from opdlab.objectives.divergence import generalized_jsd
from opdlab.types import ObjectiveOutput, Rollouts, StudentOutputs, TeacherRequest, TeacherScores

OVERLAP_K = 16
_BETA = {"kl_target_student": 0.0, "kl_student_target": 1.0}


def privileged_teacher_request(cfg: ObjectiveConfig) -> TeacherRequest:
    """Both views of the oracle trace, with hidden states for the full distributions."""
    return TeacherRequest(hidden=True, both_views=True)


def anchored_residual_logp(full_logp_N_V: torch.Tensor, partial_logp_N_V: torch.Tensor, lam: float,
                           clip: float) -> torch.Tensor:
    """log q_AR = log_softmax(log q_P + lam * clip(log q_F - log q_P, -clip, clip)). (N, V)"""
    residual_N_V = (full_logp_N_V - partial_logp_N_V).clamp(-clip, clip)
    return F.log_softmax(partial_logp_N_V + lam * residual_N_V, dim=-1)


def target_logp(kind: str, full_logp_N_V: torch.Tensor, partial_logp_N_V: torch.Tensor,
                cfg: ObjectiveConfig) -> torch.Tensor:
    if kind == "full":
        return full_logp_N_V
    if kind == "partial":
        return partial_logp_N_V
    return anchored_residual_logp(full_logp_N_V, partial_logp_N_V, cfg.anchored_residual.lam,
                                  cfg.anchored_residual.clip)


def _kl(a_logp_N_V: torch.Tensor, b_logp_N_V: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row."""
    return (a_logp_N_V.exp() * (a_logp_N_V - b_logp_N_V)).sum(-1)


def _entropy(logp_N_V: torch.Tensor) -> torch.Tensor:
    return -(logp_N_V.exp() * logp_N_V).sum(-1)


def _overlap(a_N_V: torch.Tensor, b_N_V: torch.Tensor, K: int) -> torch.Tensor:
    a_ids, b_ids = a_N_V.topk(K, dim=-1).indices, b_N_V.topk(K, dim=-1).indices
    return (a_ids[:, :, None] == b_ids[:, None, :]).any(-1).float().sum(-1) / K


def loss_positions(rollouts: Rollouts, skip_first: int) -> torch.Tensor:
    """The loss mask without each rollout's first `skip_first` completion tokens. (B, T) bool"""
    mask_B_T = rollouts.loss_mask_B_T.bool()
    pos_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device)
    return mask_B_T & (pos_T >= skip_first)[None, :]


def position_quarters(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(quarter_B_T, long_B): the quarter 0..3 of each position within its own completion, and which rollouts
    count as long (completion length at least the batch's median)."""
    len_B = rollouts.completion_mask_B_T.sum(1)
    pos_T = torch.arange(rollouts.completion_mask_B_T.shape[1], device=len_B.device)
    quarter_B_T = (4 * pos_T[None, :] // len_B.clamp(min=1)[:, None]).clamp(max=3)
    long_B = len_B >= len_B.float().median()
    return quarter_B_T, long_B


def privileged_divergence(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig,
                          target: str) -> ObjectiveOutput:
    """The shared body: divergence(target q, pi_theta) per loss token, chunked over positions."""
    partial = teacher.partial
    if teacher.hidden_B_T_H is None or partial is None or partial.hidden_B_T_H is None:
        raise ValueError("privileged objectives need the teacher's full and partial views with hidden states: "
                         "score with opdlab.teacher.views.score_views(..., ['full', 'partial'], keep_hidden=True) "
                         "(the objective table's teacher_request asks the training loop for it)")
    mask_B_T = loss_positions(rollouts, cfg.privileged.skip_first)
    n_tokens = mask_B_T.sum().clamp(min=1)
    device = student.hidden_B_T_H.device
    hidden_N_H = student.hidden_B_T_H[mask_B_T]
    full_h_N_H = teacher.hidden_B_T_H.to(device)[mask_B_T]
    partial_h_N_H = partial.hidden_B_T_H.to(device)[mask_B_T]
    quarter_B_T, long_B = position_quarters(rollouts)
    quarter_N = torch.where(long_B[:, None], quarter_B_T, -1)[mask_B_T]  # -1: not a long rollout
    beta = _BETA.get(cfg.privileged.divergence, cfg.divergence.beta)
    K = cfg.privileged.top_k

    def chunk(h_C_H, full_h_C_H, partial_h_C_H):
        z_C_V = logits_of(student, h_C_H)
        logp_C_V = F.log_softmax(z_C_V if not K else z_C_V.detach(), dim=-1)
        with torch.no_grad():
            full_C_V = F.log_softmax(logits_of(teacher, full_h_C_H), dim=-1)
            partial_C_V = F.log_softmax(logits_of(partial, partial_h_C_H), dim=-1)
            q_C_V = target_logp(target, full_C_V, partial_C_V, cfg)
            p_det_C_V = logp_C_V.detach()
            k16 = min(OVERLAP_K, q_C_V.shape[-1])
            kl_p_partial, kl_p_full = _kl(p_det_C_V, partial_C_V), _kl(p_det_C_V, full_C_V)
            stats = {
                "belief_shift": _kl(full_C_V, partial_C_V), "kl_student_partial": kl_p_partial,
                "kl_student_full": kl_p_full, "uptake": kl_p_partial - kl_p_full,
                "top16_overlap": _overlap(p_det_C_V, q_C_V, k16), "top16_overlap_views": _overlap(full_C_V, partial_C_V,
                                                                                                k16),
                "entropy_full": _entropy(full_C_V), "entropy_partial": _entropy(partial_C_V),
                "entropy_target": _entropy(q_C_V),
            }
            if K:
                ids_C_K = q_C_V.topk(min(K, q_C_V.shape[-1]), dim=-1).indices
                q_C_V = F.log_softmax(q_C_V.gather(-1, ids_C_K), dim=-1)
        if K:  # renormalised on S from the logits, so tokens outside S get exactly no gradient
            logp_C_V = F.log_softmax(z_C_V.gather(-1, ids_C_K), dim=-1)
        loss_C = generalized_jsd(logp_C_V, q_C_V, beta)
        stats["target"] = loss_C.detach()
        return loss_C, stats

    loss_sum, stats_N = run_chunks(chunk, student.chunk_size, hidden_N_H, full_h_N_H, partial_h_N_H,
                                   params=student.lm_head.parameters())
    loss = zero_loss(student) if loss_sum is None else loss_sum / n_tokens
    metrics = token_metrics(rollouts, student, teacher)
    if stats_N:
        div_N = stats_N.pop("target")
        metrics["div/target"] = div_N.mean()
        metrics.update(mean_stats(stats_N, "priv/"))
        shift = stats_N["belief_shift"].mean()
        metrics["priv/uptake_ratio"] = torch.where(shift > 1e-8, stats_N["uptake"].mean() / shift.clamp(min=1e-8),
                                                   torch.full_like(shift, math.nan))
        for q, name in ((0, "first"), (3, "last")):
            sel_N = quarter_N == q
            metrics[f"drift/div_{name}_quarter"] = torch.where(
                sel_N.any(), (div_N * sel_N).sum() / sel_N.sum().clamp(min=1), torch.full_like(shift, math.nan))
    return ObjectiveOutput(loss=loss, metrics=to_floats(metrics))


def privileged_full(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
                    cfg: ObjectiveConfig) -> ObjectiveOutput:
    """Privileged OPD on the full view: divergence(q_F, pi_theta), q_F = teacher with the whole oracle trace."""
    return privileged_divergence(rollouts, student, teacher, cfg, "full")


def privileged_partial(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
                       cfg: ObjectiveConfig) -> ObjectiveOutput:
    """Privileged OPD on the partial view: divergence(q_P, pi_theta), q_P = teacher with the trace's first rho."""
    return privileged_divergence(rollouts, student, teacher, cfg, "partial")


def anchored_residual(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
                      cfg: ObjectiveConfig) -> ObjectiveOutput:
    """AR-OPD: divergence(q_AR, pi_theta), log q_AR = log_softmax(log q_P + lambda clip(log q_F - log q_P, -c, c))."""
    return privileged_divergence(rollouts, student, teacher, cfg, "anchored_residual")
