"""Teacher top-K local support matching (LSM), docs/methods.md#local-support-matching-lsm.

A support S(c_t) of at most K + 1 tokens per position; both distributions are renormalised on S (a softmax over
the in-support logits / log-probs):

    pi_hat_theta(v) = pi_theta(v) / sum_{u in S} pi_theta(u),    q_hat(v) = pi_T(v) / sum_{u in S} pi_T(u)

and the per-token loss is the truncated reverse KL, student first,

    KL(pi_hat_theta || q_hat) = sum_{v in S} pi_hat_theta(v) (log pi_hat_theta(v) - log q_hat(v)),

summed over loss tokens and divided by the number of loss tokens in the batch. Tokens outside S get no gradient.
`objective.lsm.support` picks S (K = `objective.support_k`, default 32):

    teacher_topk          S = TopK(pi_T)                       (default; the teacher returns only its top-K)
    teacher_topk_sampled  S = TopK(pi_T) ∪ {y_t}                 (pi_T(y_t) is the scored sampled-token log-prob)
    student_topk          S = TopK(pi_theta) ∪ {y_t}             (pi_T on S from the teacher's hidden states)
    head_tail             S = TopK(pi_T), plus for y_t not in S the sampled-token policy-gradient term
                          -A_t * ratio_t,  A_t = -kappa (log pi_old(y_t) - log pi_T(y_t)),
                          ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))   (kappa = objective.kl_coef; no clip)

The student's logits are made chunk by chunk from its hidden states (each chunk's gradient is taken before the next
chunk is made, `opdlab.objectives.common.run_chunks`, so the step holds one chunk), gathered at S; its top-K (for
student_topk and the overlap diagnostic) comes from the same chunk. Rollouts for this objective default to top-p 0.9
(`rollout.top_p`). Diagnostics: those of `opdlab.objectives.common` on this S, and
for head_tail the two parts of the loss, `support/head_loss` and `support/tail_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.objectives.common import logits_of, mean_stats, run_chunks, support_stats, to_floats, token_metrics, \
    zero_loss
from opdlab.types import ObjectiveOutput, Rollouts, StudentOutputs, TeacherRequest, TeacherScores


def lsm_teacher_request(cfg: ObjectiveConfig) -> TeacherRequest:
    """The teacher's top-K log-probs, or its hidden states when S is the student's top-K."""
    if cfg.lsm.support == "student_topk":
        return TeacherRequest(hidden=True)
    return TeacherRequest(top_k=cfg.support_k)


def renormalised_kl(student_logits_N_S: torch.Tensor, teacher_logp_N_S: torch.Tensor,
                    valid_N_S: torch.Tensor) -> torch.Tensor:
    """sum_{v in S} pi_hat(v) (log pi_hat(v) - log q_hat(v)), both renormalised over the valid entries of S. (N,)

    Invalid entries (a duplicate slot) are -inf before the softmax and zeroed after it, so they carry neither
    probability nor gradient, and no NaN reaches the backward pass."""
    logp_N_S = F.log_softmax(student_logits_N_S.masked_fill(~valid_N_S, float("-inf")), dim=-1)
    logq_N_S = F.log_softmax(teacher_logp_N_S.masked_fill(~valid_N_S, float("-inf")), dim=-1)
    diff_N_S = logp_N_S.masked_fill(~valid_N_S, 0.0) - logq_N_S.masked_fill(~valid_N_S, 0.0)
    return (logp_N_S.exp() * diff_N_S).sum(-1)


def _with_sampled(ids_C_K: torch.Tensor, y_C: torch.Tensor):
    """(S ids, valid) for S = ids ∪ {y}: y's slot is invalid where y is already among ids."""
    ids_C_S = torch.cat([ids_C_K, y_C[:, None]], dim=-1)
    valid_C_S = torch.ones_like(ids_C_S, dtype=torch.bool)
    valid_C_S[:, -1] = ~(ids_C_K == y_C[:, None]).any(-1)
    return ids_C_S, valid_C_S


def lsm(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig) -> ObjectiveOutput:
    """LSM: KL(pi_theta || pi_T) (student first), both renormalised on a top-K support S (objective.lsm.support)."""
    mask_B_T = rollouts.loss_mask_B_T.bool()
    n_tokens = mask_B_T.sum().clamp(min=1)
    K, support = cfg.support_k, cfg.lsm.support
    hidden_N_H = student.hidden_B_T_H[mask_B_T]
    sampled_N = rollouts.completion_ids_B_T[mask_B_T]
    if support == "student_topk":
        if teacher.hidden_B_T_H is None:
            raise ValueError("lsm with support='student_topk' needs the teacher's hidden states: "
                             "score(..., keep_hidden=True)")
        teacher_in = (None, None, None, teacher.hidden_B_T_H.to(hidden_N_H.device)[mask_B_T])
    else:
        if teacher.topk_ids_B_T_K.shape[-1] < K:
            raise ValueError(f"lsm needs the teacher's top-{K} (objective.support_k) but the scores hold "
                             f"{teacher.topk_ids_B_T_K.shape[-1]}: score(..., top_k={K})")
        teacher_in = (teacher.topk_ids_B_T_K[mask_B_T][:, :K], teacher.topk_logp_B_T_K[mask_B_T][:, :K],
                      teacher.logp_B_T[mask_B_T], None)

    def chunk(h_C_H, y_C, t_ids_C_K, t_logp_C_K, t_logp_y_C, teacher_h_C_H):
        z_C_V = logits_of(student, h_C_H)
        with torch.no_grad():
            logp_C_V = F.log_softmax(z_C_V.detach(), dim=-1)
            s_ids_C_K = logp_C_V.topk(K, dim=-1).indices
        if support == "student_topk":
            with torch.no_grad():
                logq_C_V = F.log_softmax(logits_of(teacher, teacher_h_C_H), dim=-1)
                t_ids_C_K = logq_C_V.topk(K, dim=-1).indices
                ids_C_S, valid_C_S = _with_sampled(s_ids_C_K, y_C)
                t_logp_C_S = logq_C_V.gather(-1, ids_C_S)
        elif support == "teacher_topk_sampled":
            ids_C_S, valid_C_S = _with_sampled(t_ids_C_K, y_C)
            t_logp_C_S = torch.cat([t_logp_C_K, t_logp_y_C[:, None]], dim=-1)
        else:  # teacher_topk, head_tail
            ids_C_S, valid_C_S = t_ids_C_K, torch.ones_like(t_ids_C_K, dtype=torch.bool)
            t_logp_C_S = t_logp_C_K
        loss_C = renormalised_kl(z_C_V.gather(-1, ids_C_S), t_logp_C_S, valid_C_S)
        stats = support_stats(logp_C_V, ids_C_S, valid_C_S, t_logp_C_S, t_ids_C_K, y_C, student_topk_ids_C_K=s_ids_C_K,
                              sampled_topk="student" if support == "student_topk" else "teacher")
        return loss_C, stats

    loss_sum, stats_N = run_chunks(chunk, student.chunk_size, hidden_N_H, sampled_N, *teacher_in,
                                   params=student.lm_head.parameters())
    head = zero_loss(student) if loss_sum is None else loss_sum
    metrics = {**token_metrics(rollouts, student, teacher)}
    if support == "head_tail":
        outside_B_T = mask_B_T & ~(teacher.topk_ids_B_T_K[..., :K] == rollouts.completion_ids_B_T[..., None]).any(-1)
        advantage_B_T = -cfg.kl_coef * (rollouts.logp_old_B_T - teacher.logp_B_T)
        ratio_B_T = torch.exp(torch.where(outside_B_T, student.logp_B_T - rollouts.logp_old_B_T, 0.0))
        tail = -torch.where(outside_B_T, ratio_B_T * advantage_B_T, 0.0).sum()
        with torch.no_grad():
            metrics["support/head_loss"] = head.detach() / n_tokens
            metrics["support/tail_loss"] = tail.detach() / n_tokens
        head = head + tail
    metrics.update(mean_stats(stats_N))
    return ObjectiveOutput(loss=head / n_tokens, metrics=to_floats(metrics))
