"""Full-vocabulary divergences and generalised JSD (GKD), docs/methods.md#full-vocabulary-divergences-and-gkd.

Per loss token, with p = pi_theta(.|c_t) and q = pi_T(.|c_t) over the whole vocabulary, both computed from logits
divided by the temperature tau (`objective.divergence.temperature`):

    forward_kl   KL(pi_T || pi_theta)  = sum_v q(v) (log q(v) - log p(v))       teacher first ("mode covering")
    reverse_kl   KL(pi_theta || pi_T)  = sum_v p(v) (log p(v) - log q(v))       student first ("mode seeking")
    jsd          JSD_beta = beta KL(pi_T || M) + (1 - beta) KL(pi_theta || M),  M = beta q + (1 - beta) p

JSD_beta itself tends to 0 at both ends; JSD_beta / beta -> KL(pi_T || pi_theta) as beta -> 0 and
JSD_beta / (1 - beta) -> KL(pi_theta || pi_T) as beta -> 1. As in TRL's `generalized_jsd_loss`, beta = 0 and
beta = 1 are defined as those limits: jsd with beta = 0 is forward_kl, with beta = 1 is reverse_kl, exactly.

Loss = sum over loss tokens of the per-token value / number of loss tokens in the batch. The gradient reaches every
logit of the student. GKD's data mix (student rollouts with probability lambda, else reference responses) is the
training loop's choice of batch (`objective.gkd_lambda`), not part of these functions.

Memory: the teacher's hidden states and output layer come in `TeacherScores` (scored with keep_hidden=True); both
models' logits are made `student.chunk_size` positions at a time and each chunk's gradient is taken before the next
chunk is made (`opdlab.objectives.common.run_chunks`), so no (B, T, V) tensor exists for either model. Diagnostics
(`div/*`, `support/*` with S = the teacher's top-K) come from the same chunks, at the objective's temperature. At
temperature 1 the chunks also give the teacher's sampled-token log-prob, entropy and max-prob at every loss
position (`ObjectiveOutput.teacher_stats`), so `score` makes no logits of its own there
(`TeacherRequest.stats_from_objective`): each teacher logit chunk is made once a step.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.models.logprobs import scatter_back
from opdlab.objectives.common import logits_of, mean_stats, run_chunks, teacher_topk_stats, to_floats, \
    token_metrics, zero_loss
from opdlab.types import ObjectiveOutput, Rollouts, StudentOutputs, TeacherScores


def generalized_jsd(student_logp_N_V: torch.Tensor, teacher_logp_N_V: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row JSD_beta of (pi_T, pi_theta) from log-probs; beta = 0 gives KL(pi_T || pi_theta), beta = 1 gives
    KL(pi_theta || pi_T). Returns (N,)."""
    logp, logq = student_logp_N_V, teacher_logp_N_V
    if beta == 0:
        return (logq.exp() * (logq - logp)).sum(-1)
    if beta == 1:
        return (logp.exp() * (logp - logq)).sum(-1)
    log_m = torch.logaddexp(logq + math.log(beta), logp + math.log(1 - beta))
    kl_teacher_m = (logq.exp() * (logq - log_m)).sum(-1)
    kl_student_m = (logp.exp() * (logp - log_m)).sum(-1)
    return beta * kl_teacher_m + (1 - beta) * kl_student_m


def rowdot(a_C_V: torch.Tensor, b_C_V: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row, in the inputs' dtype (fp32 here: outside autocast, which would run it in bf16), as a
    batched matmul: on a CPU about 2.5x faster than a product and a sum over a (1024, 49152) pair."""
    with torch.autocast(a_C_V.device.type, enabled=False):
        return torch.einsum("cv,cv->c", a_C_V, b_C_V)


class KLRows(torch.autograd.Function):
    """Per-row KL between the student's softmax(z) and the teacher's fixed distribution, reverse (p first) or
    forward (q first), with its gradient w.r.t. the logits z written out instead of traced through autograd:

        reverse  KL(p || q) = sum_v p (log p - log q),  d/dz_j = p_j (log p_j - log q_j - KL(p || q))
        forward  KL(q || p) = sum_v q (log q - log p),  d/dz_j = p_j - q_j

    The gradient is made in the forward pass (one (C, V) tensor kept), in fewer (C, V) passes than autograd's graph
    through log_softmax, exp, the product and the sum: the whole objective ran 1.04-1.10x faster at the SmolLM2
    pair's shapes (bench/divergence_chunk.py). Returns (the KL, the other direction's KL, log p), the last two
    without gradient."""

    @staticmethod
    def forward(ctx, z_C_V, logq_C_V, q_C_V, reverse: bool):
        logp_C_V = F.log_softmax(z_C_V, dim=-1)
        p_C_V = logp_C_V.exp()
        diff_C_V = logp_C_V - logq_C_V
        reverse_C, forward_C = rowdot(p_C_V, diff_C_V), -rowdot(q_C_V, diff_C_V)
        grad_C_V = diff_C_V.sub_(reverse_C[:, None]).mul_(p_C_V) if reverse else p_C_V.sub_(q_C_V)
        ctx.save_for_backward(grad_C_V)
        ctx.mark_non_differentiable(logp_C_V, forward_C if reverse else reverse_C)
        return (reverse_C, forward_C, logp_C_V) if reverse else (forward_C, reverse_C, logp_C_V)

    @staticmethod
    def backward(ctx, grad_loss_C, _grad_other_C, _grad_logp):
        (grad_C_V,) = ctx.saved_tensors
        return grad_C_V * grad_loss_C[:, None], None, None, None


def full_vocab_divergence(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig,
                          beta: float) -> ObjectiveOutput:
    """The shared body of forward_kl / reverse_kl / jsd: JSD_beta per loss token, chunked over positions."""
    if teacher.hidden_B_T_H is None:
        raise ValueError("full-vocabulary objectives need the teacher's hidden states: score(..., keep_hidden=True)")
    mask_B_T = rollouts.loss_mask_B_T.bool()
    n_tokens = mask_B_T.sum().clamp(min=1)
    tau = cfg.divergence.temperature
    hidden_N_H = student.hidden_B_T_H[mask_B_T]
    teacher_hidden_N_H = teacher.hidden_B_T_H.to(hidden_N_H.device)[mask_B_T]
    sampled_N = rollouts.completion_ids_B_T[mask_B_T]

    def scaled(logits_C_V):  # (a division by 1 would still cost a pass over (C, V))
        return logits_C_V if tau == 1 else logits_C_V / tau

    def chunk(h_C_H, teacher_h_C_H, y_C):
        z_C_V = scaled(logits_of(student, h_C_H))
        with torch.no_grad():
            logq_C_V = F.log_softmax(scaled(logits_of(teacher, teacher_h_C_H)), dim=-1)
            q_C_V = logq_C_V.exp()
        if beta in (0.0, 1.0):  # the loss is one KL and the diagnostic the other: both from one difference
            loss_C, other_C, logp_C_V = KLRows.apply(z_C_V, logq_C_V, q_C_V, beta == 1)
        else:
            logp_C_V = F.log_softmax(z_C_V, dim=-1)
        with torch.no_grad():
            stats = teacher_topk_stats(logp_C_V.detach(), logq_C_V, y_C, min(cfg.support_k, logq_C_V.shape[-1]))
            # the teacher's token statistics at these positions (TeacherRequest.stats_from_objective)
            stats.update(teacher_logp=logq_C_V.gather(-1, y_C[:, None]).squeeze(-1),
                         teacher_entropy=-rowdot(q_C_V, logq_C_V),
                         teacher_maxp=q_C_V.max(-1).values)
        if beta == 1:
            stats.update(kl_student_teacher=loss_C.detach(), kl_teacher_student=other_C)
            return loss_C, stats
        if beta == 0:
            stats.update(kl_teacher_student=loss_C.detach(), kl_student_teacher=other_C)
            return loss_C, stats
        with torch.no_grad():  # before the loss, while the loss's saved (C, V) tensors do not exist yet
            logp_det_C_V = logp_C_V.detach()
            stats.update(kl_teacher_student=generalized_jsd(logp_det_C_V, logq_C_V, 0.0),
                         kl_student_teacher=generalized_jsd(logp_det_C_V, logq_C_V, 1.0))
        return generalized_jsd(logp_C_V, logq_C_V, beta), stats

    loss_sum, stats_N = run_chunks(chunk, student.chunk_size, hidden_N_H, teacher_hidden_N_H, sampled_N,
                                   params=student.lm_head.parameters())
    loss = zero_loss(student) if loss_sum is None else loss_sum / n_tokens
    div = {k: stats_N.pop(k) for k in ("kl_teacher_student", "kl_student_teacher") if k in stats_N}
    own = {k[len("teacher_"):]: stats_N.pop(k) for k in ("teacher_logp", "teacher_entropy", "teacher_maxp")
           if k in stats_N}
    if own and tau == 1:  # the sampled-token metrics from this objective's own teacher log-probs (exact, and set
        # where `score` left them pending)
        teacher = replace(teacher, logp_B_T=scatter_back(own["logp"], mask_B_T.to(own["logp"].device)))
    metrics = {**token_metrics(rollouts, student, teacher), **mean_stats(stats_N), **mean_stats(div, "div/")}
    return ObjectiveOutput(loss=loss, metrics=to_floats(metrics), teacher_stats=own if tau == 1 else None)


def forward_kl(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
               cfg: ObjectiveConfig) -> ObjectiveOutput:
    """Full-vocabulary KL(pi_T || pi_theta) per token (teacher first), at objective.divergence.temperature."""
    return full_vocab_divergence(rollouts, student, teacher, cfg, beta=0.0)


def reverse_kl(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores,
               cfg: ObjectiveConfig) -> ObjectiveOutput:
    """Full-vocabulary KL(pi_theta || pi_T) per token (student first), at objective.divergence.temperature."""
    return full_vocab_divergence(rollouts, student, teacher, cfg, beta=1.0)


def jsd(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores, cfg: ObjectiveConfig) -> ObjectiveOutput:
    """Generalised JSD_beta (GKD): beta KL(pi_T||M) + (1-beta) KL(pi_theta||M), M = beta pi_T + (1-beta) pi_theta."""
    return full_vocab_divergence(rollouts, student, teacher, cfg, beta=cfg.divergence.beta)
