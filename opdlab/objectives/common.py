"""What the objectives share: logits chunk by chunk over loss positions, and the per-step diagnostics.

`run_chunks` applies a per-chunk function to `chunk_size` rows at a time. With gradients enabled each chunk's
gradient is taken as soon as its loss is made, and its graph freed (`_SummedChunks`), so the step holds one
chunk's (chunk_size, V) logits, never (B, T, V). Checkpointing each chunk instead would bound memory the same way
but make every chunk twice (both models' logits and the diagnostics): about half the time of a full-vocabulary loss
at a 150k vocabulary.

Diagnostics (docs/methods.md#local-support-matching-lsm), all means over loss tokens, computed under no_grad from
tensors the objective already has; every value stays a tensor until `to_floats`, which syncs once:

    train/reverse_kl       sampled-token estimate of KL(pi_old || pi_T): mean of log pi_old(y_t) - log pi_T(y_t)
    train/neg_reward_frac  fraction of sampled tokens with negative reward, log pi_T(y_t) < log pi_old(y_t)
    gap/pos_A_B            mean of log pi_T(y_t) - log pi_theta(y_t) over completion positions A <= t < B
    support/teacher_mass   sum_{v in S} pi_T(v): the teacher's mass on the support S
    support/student_mass   sum_{v in S} pi_theta(v)
    support/topk_overlap   |TopK(pi_T) ∩ TopK(pi_theta)| / K, K = objective.support_k
    support/sampled_in_topk  fraction of sampled tokens inside the teacher's top-K (the student's, for student_topk)
    support/size           mean |S| (K, or K + 1 where the sampled token was added to S)

S is the objective's support: the teacher's top-K for opd and the full-vocabulary divergences, the configured
support for lsm.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from opdlab.models.logprobs import chunk_logits
from opdlab.types import Rollouts, StudentOutputs, TeacherScores

# Completion-position buckets of the teacher-student gap: [0, 32), [32, 128), [128, 512), [512, inf).
POSITION_EDGES = (0, 32, 128, 512)
REWARD_EPS = 1e-4  # added to a group's reward std (as TRL's GRPO)


def logits_of(out: StudentOutputs | TeacherScores, hidden_C_H: torch.Tensor) -> torch.Tensor:
    """(C, V) fp32 logits of a model from its last hidden states (the model's output layer, vocabulary, softcap)."""
    if out.lm_head is None:
        raise ValueError("these scores carry no hidden states / output layer: score the teacher with "
                         "keep_hidden=True (the objective table's teacher_request says when)")
    return chunk_logits(hidden_C_H, out.lm_head, out.vocab_size, out.softcap)


class _SummedChunks(torch.autograd.Function):
    """sum over all rows of `fn`'s per-row loss, whose gradient w.r.t. every input row and parameter is computed in
    the forward pass, one chunk at a time: the chunk's graph (its logits, log-probs, ...) lives only while its own
    gradient is taken. The backward pass scales the stored gradients by the incoming one; that is exact because the
    output is the scalar sum."""

    @staticmethod
    def forward(ctx, fn, chunk_size, stats_out, n_tensors, *inputs):
        tensors, params = inputs[:n_tensors], inputs[n_tensors:]
        wants = ctx.needs_input_grad[4:]
        grads_N = [torch.zeros_like(t) if want else None for t, want in zip(tensors, wants)]
        grads_params = [torch.zeros_like(p) if want else None for p, want in zip(params, wants[n_tensors:])]
        N = next(t for t in tensors if t is not None).shape[0]
        losses = []
        with torch.enable_grad():
            for start in range(0, N, chunk_size):
                rows = [None if t is None else t[start:start + chunk_size].detach().requires_grad_(g is not None)
                        for t, g in zip(tensors, grads_N)]
                loss_C, stats_C = fn(*rows)
                wrt = [r for r, g in zip(rows, grads_N) if g is not None] + \
                    [p for p, g in zip(params, grads_params) if g is not None]
                grads = iter(torch.autograd.grad(loss_C.sum(), wrt, allow_unused=True) if wrt else ())
                for g_N in grads_N:
                    if g_N is not None and (g_C := next(grads)) is not None:
                        g_N[start:start + chunk_size] = g_C
                for g_P in grads_params:
                    if g_P is not None and (g := next(grads)) is not None:
                        g_P += g
                losses.append(loss_C.detach())
                stats_out.append(stats_C)
        ctx.grads = grads_N + grads_params
        return torch.cat(losses).sum()

    @staticmethod
    def backward(ctx, grad_total):
        return (None, None, None, None, *[None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads])


def run_chunks(fn: Callable, chunk_size: int, *tensors_N: torch.Tensor | None, params=()):
    """Apply `fn(*rows)` to `chunk_size` rows of every tensor at a time (None passes through as None).

    `fn` returns (loss_C, stats) with `loss_C` per row and `stats` a dict of (C,) tensors made without gradient; the
    result is (loss, stats_N), `loss` the 0-d sum of loss_C over all rows, or None when there are no rows. Gradients
    reach the tensors and `params` (the output-layer weights `fn` uses), and nothing else."""
    N = next(t for t in tensors_N if t is not None).shape[0]
    if N == 0:
        return None, {}
    params = [p for p in params if p.requires_grad]
    stats: list[dict] = []
    if torch.is_grad_enabled() and (params or any(t is not None and t.requires_grad for t in tensors_N)):
        loss = _SummedChunks.apply(fn, chunk_size, stats, len(tensors_N), *tensors_N, *params)
    else:
        losses = []
        for start in range(0, N, chunk_size):
            loss_C, stats_C = fn(*[None if t is None else t[start:start + chunk_size] for t in tensors_N])
            losses.append(loss_C)
            stats.append(stats_C)
        loss = torch.cat(losses).sum()
    return loss, {k: torch.cat([s[k] for s in stats]) for k in stats[0]}


@torch.no_grad()
def support_stats(student_logp_C_V: torch.Tensor, support_ids_C_S: torch.Tensor, support_valid_C_S: torch.Tensor,
                  teacher_logp_C_S: torch.Tensor, teacher_topk_ids_C_K: torch.Tensor, sampled_C: torch.Tensor,
                  student_topk_ids_C_K: torch.Tensor | None = None, sampled_topk: str = "teacher"
                  ) -> dict[str, torch.Tensor]:
    """Per-position support/* statistics. `teacher_logp_C_S` are the teacher's (full-vocabulary) log-probs on S;
    invalid entries of S (a sampled token already in it) are left out of the sums."""
    valid_C_S = support_valid_C_S.float()
    K = teacher_topk_ids_C_K.shape[-1]
    if student_topk_ids_C_K is None:
        student_topk_ids_C_K = student_logp_C_V.topk(K, dim=-1).indices
    shared_C = (teacher_topk_ids_C_K[:, :, None] == student_topk_ids_C_K[:, None, :]).any(-1).float().sum(-1)
    base_C_K = teacher_topk_ids_C_K if sampled_topk == "teacher" else student_topk_ids_C_K
    return {
        "teacher_mass": (teacher_logp_C_S.exp() * valid_C_S).sum(-1),
        "student_mass": (student_logp_C_V.gather(-1, support_ids_C_S).exp() * valid_C_S).sum(-1),
        "topk_overlap": shared_C / K,
        "sampled_in_topk": (base_C_K == sampled_C[:, None]).any(-1).float(),
        "size": valid_C_S.sum(-1),
    }


def teacher_topk_stats(student_logp_C_V: torch.Tensor, teacher_logp_C_V: torch.Tensor, sampled_C: torch.Tensor,
                       K: int) -> dict[str, torch.Tensor]:
    """support/* statistics with S = the teacher's top-K, from both full distributions."""
    with torch.no_grad():
        t_logp_C_K, t_ids_C_K = teacher_logp_C_V.topk(K, dim=-1)
        return support_stats(student_logp_C_V, t_ids_C_K, torch.ones_like(t_ids_C_K, dtype=torch.bool),
                             t_logp_C_K, t_ids_C_K, sampled_C)


@torch.no_grad()
def student_support_stats(student: StudentOutputs, mask_B_T: torch.Tensor, teacher: TeacherScores, sampled_N,
                          K: int) -> dict[str, torch.Tensor]:
    """support/* statistics with S = the teacher's top-K from `teacher.topk_*`, for an objective that has no
    student logits of its own (opd): the student's output layer is applied to its detached hidden states."""
    K = min(K, teacher.topk_ids_B_T_K.shape[-1])
    if K == 0 or not mask_B_T.any():
        return {}
    hidden_N_H = student.hidden_B_T_H.detach()[mask_B_T]
    t_ids_N_K, t_logp_N_K = teacher.topk_ids_B_T_K[mask_B_T][:, :K], teacher.topk_logp_B_T_K[mask_B_T][:, :K]

    def chunk(h_C_H, t_ids_C_K, t_logp_C_K, y_C):
        logp_C_V = F.log_softmax(logits_of(student, h_C_H), dim=-1)
        stats = support_stats(logp_C_V, t_ids_C_K, torch.ones_like(t_ids_C_K, dtype=torch.bool), t_logp_C_K,
                              t_ids_C_K, y_C)
        return logp_C_V.new_zeros(0), stats

    return run_chunks(chunk, student.chunk_size, hidden_N_H, t_ids_N_K, t_logp_N_K, sampled_N)[1]


@torch.no_grad()
def token_metrics(rollouts: Rollouts, student: StudentOutputs, teacher: TeacherScores) -> dict[str, torch.Tensor]:
    """Sampled-token diagnostics over the loss mask (0-d tensors; buckets without tokens are NaN)."""
    mask_B_T = rollouts.loss_mask_B_T.float()
    n = mask_B_T.sum().clamp(min=1.0)
    rkl_B_T = (rollouts.logp_old_B_T - teacher.logp_B_T) * mask_B_T
    out = {
        "train/reverse_kl": rkl_B_T.sum() / n,
        "train/neg_reward_frac": ((rkl_B_T > 0).float() * mask_B_T).sum() / n,
    }
    gap_B_T = (teacher.logp_B_T - student.logp_B_T.detach()) * mask_B_T
    pos_T = torch.arange(mask_B_T.shape[1], device=mask_B_T.device)
    edges = (*POSITION_EDGES, math.inf)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bucket_B_T = mask_B_T * ((pos_T >= lo) & (pos_T < hi)).float()
        count = in_bucket_B_T.sum()
        name = f"gap/pos_{lo}_{hi}" if hi != math.inf else f"gap/pos_{lo}+"
        out[name] = torch.where(count > 0, (gap_B_T * in_bucket_B_T).sum() / count.clamp(min=1.0),
                                torch.full_like(count, math.nan))
    return out


def group_normalised_rewards(rewards_B: torch.Tensor, group_size: int, norm: str = "std",
                             eps: float = REWARD_EPS) -> torch.Tensor:
    """GRPO's advantage of each rollout: its reward less the mean of its group (rows [g*n, (g+1)*n) are one prompt's
    n = `group_size` samples), divided by the group's std (1/(n-1), plus `eps`) when `norm` is 'std'; 'mean' only
    centres (Dr. GRPO). A group whose rewards are all equal gets 0 (no reward signal). float32, shape (B,)."""
    if group_size < 2 or rewards_B.numel() % group_size:
        raise ValueError(f"group normalisation needs groups of >= 2 samples that divide the batch: "
                         f"{rewards_B.numel()} rewards in groups of {group_size}")
    r_G_N = rewards_B.double().reshape(-1, group_size)
    adv_G_N = r_G_N - r_G_N.mean(-1, keepdim=True)
    if norm == "std":
        adv_G_N = adv_G_N / (r_G_N.std(-1, keepdim=True) + eps)
    elif norm != "mean":
        raise ValueError(f"unknown reward normalisation {norm!r}; allowed: std, mean")
    return adv_G_N.reshape(-1).float()


def reward_term(rollouts: Rollouts, cfg, mask_B_T: torch.Tensor) -> torch.Tensor | None:
    """(B, T) w * A_i on loss positions, the task-reward term a sampled-token objective adds to its advantage
    (w = objective.reward_weight, A_i = `Rollouts.reward_advantage_B`); None when w is 0, so that the objective is
    then exactly the one without it."""
    if not cfg.reward_weight:
        return None
    if rollouts.reward_advantage_B is None:
        raise ValueError("objective.reward_weight > 0 needs the rollouts' group-normalised rewards "
                         "(Rollouts.reward_advantage_B; the training loop sets them, opdlab.step.with_rewards)")
    return cfg.reward_weight * rollouts.reward_advantage_B.to(mask_B_T.dtype)[:, None] * mask_B_T


def reward_share(teacher_advantage_B_T: torch.Tensor, reward_B_T: torch.Tensor, mask_B_T: torch.Tensor
                 ) -> torch.Tensor:
    """sum |reward term| / (sum |teacher term| + sum |reward term|) over loss tokens: how much of the advantage the
    task reward makes up (0 with a constant reward in every group, 1 with the teacher term off)."""
    reward = (reward_B_T.abs() * mask_B_T).sum()
    return reward / ((teacher_advantage_B_T.abs() * mask_B_T).sum() + reward).clamp(min=1e-12)


def mean_stats(stats_N: dict[str, torch.Tensor], prefix: str = "support/") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.float().mean() for k, v in stats_N.items() if v.numel()}


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device sync for all metrics; NaN entries (no data this step) are left out."""
    if not metrics:
        return {}
    device = next(iter(metrics.values())).device
    values = torch.stack([v.detach().double().reshape(()).to(device) for v in metrics.values()]).tolist()
    return {k: v for k, v in zip(metrics, values) if not math.isnan(v)}


def zero_loss(student: StudentOutputs) -> torch.Tensor:
    """A zero that is still connected to the student's graph (a batch without loss tokens)."""
    return student.logp_B_T.sum() * 0.0
