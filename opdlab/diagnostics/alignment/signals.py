"""The numbers behind gradient alignment (docs/methods.md#gradient-alignment), as small pure functions.

At a node u = (x, y_<t) with student logits z and p = softmax(z):

    V_j      success probability when token j is forced at u and the student continues (estimated elsewhere:
             `opdlab.diagnostics.alignment.targeted`)
    P_succ   sum_j p_j V_j
    g*_j     dP_succ/dz_j = p_j (V_j - P_succ)                 (the ideal logit gradient: ascent on success)
    d_j      -dL/dz_j of a distillation objective L              (its descent direction in logit space)

Both are compared on the candidate set C (sampled token ∪ student top-k ∪ teacher top-k), with p renormalised on C
(p_hat = p / sum_C p, P_succ = sum_C p_hat V): the success values outside C are unknown. Alignment is
cosine(g*_C, d_C); it is undefined (None) where either vector is zero, e.g. where every candidate has the same V.

`descent_directions` gets d by autograd through any entry of the objective table, with the table's one signature:
the student's logits of one rollout become a leaf tensor, handed to the objective as "hidden states" behind an
identity output layer, so the objective's own code (chunking, masking, normalisation) runs unchanged and the
gradient it produces is the gradient w.r.t. the logits. New objectives work as soon as they are in the table.

    from opdlab.diagnostics.alignment.signals import ideal_gradient
    ideal_gradient([0.5, 0.3, 0.2], [1.0, 0.0, 0.5])     # (0.6, array([ 0.2 , -0.18, -0.02]))
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.types import Rollouts, StudentOutputs, TeacherScores


def ideal_gradient(p_C: Sequence[float], V_C: Sequence[float]) -> tuple[float, np.ndarray]:
    """(P_succ, g*_C) on the candidate set, with p renormalised on it. float64."""
    p = np.asarray(p_C, dtype=np.float64)
    V = np.asarray(V_C, dtype=np.float64)
    if p.shape != V.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"p and V must be equal-length non-empty vectors, got shapes {p.shape} and {V.shape}")
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"p must be non-negative with a positive sum, got {p}")
    p_hat = p / p.sum()
    p_succ = float((p_hat * V).sum())
    return p_succ, p_hat * (V - p_succ)


def cosine(a: Sequence[float], b: Sequence[float], eps: float = 1e-30) -> float | None:
    """cos(a, b) in float64; None where either vector is (numerically) zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= eps or nb <= eps or not (math.isfinite(na) and math.isfinite(nb)):
        return None
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def exponential_depths(length: int, ratio: float) -> list[int]:
    """Completion positions 0 <= t < length at exponentially growing depths: floor(ratio^k) - 1, deduplicated.

    ratio 2 gives 0, 1, 3, 7, 15, 31, ...; ratio 1.5 gives 0, 1, 2, 4, 6, 10, 16, 24, ..."""
    if ratio <= 1:
        raise ValueError(f"depth ratio must be > 1, got {ratio}")
    depths, k = [], 0
    while True:
        d = math.floor(ratio ** k) - 1
        if d >= length:
            return depths
        if not depths or d != depths[-1]:
            depths.append(d)
        k += 1


def candidate_set(sampled: int, student_logits_V: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
                  student_k: int, teacher_k: int) -> list[int]:
    """Sampled token, then the student's top-k, then each teacher's top-k, without repeats (in that order)."""
    ids = [int(sampled)]
    groups = [student_logits_V.topk(min(student_k, student_logits_V.shape[-1])).indices] if student_k else []
    groups += [z.topk(min(teacher_k, z.shape[-1])).indices for z in teacher_logits] if teacher_k else []
    for group in groups:
        for i in group.tolist():
            if i not in ids:
                ids.append(i)
    return ids


def select_nodes(candidate_counts: Sequence[Sequence[tuple[int, int]]], budget: int, per_candidate: int,
                 max_nodes_per_rollout: int | None = None) -> list[tuple[int, int]]:
    """Which (rollout, position) nodes to measure under a budget of targeted rollouts.

    `candidate_counts[r]` lists (position, |C|) for rollout r at its exponential depths, shallowest first. Nodes are
    taken level by level (every rollout's first depth, then every rollout's second, ...), each costing
    |C| * per_candidate rollouts, until the next one would exceed the budget; so every rollout gets its shallow
    nodes before any gets deep ones. Returns (rollout, position) pairs sorted by rollout and position."""
    chosen, spent, level = [], 0, 0
    levels = max((len(c) for c in candidate_counts), default=0)
    if max_nodes_per_rollout is not None:
        levels = min(levels, max_nodes_per_rollout)
    while level < levels:
        for r, nodes in enumerate(candidate_counts):
            if level < len(nodes):
                position, size = nodes[level]
                cost = size * per_candidate
                if spent + cost > budget:
                    return sorted(chosen)
                chosen.append((r, position))
                spent += cost
        level += 1
    return sorted(chosen)


def student_outputs_from_logits(rollouts: Rollouts, z_B_T_V: torch.Tensor, chunk_size: int = 1024) -> StudentOutputs:
    """`StudentOutputs` whose hidden states are the logits `z_B_T_V` themselves (identity output layer), so an
    objective's gradient w.r.t. `hidden_B_T_H` is its gradient w.r.t. the student's logits."""
    mask_B_T = rollouts.completion_mask_B_T.bool()
    logp_B_T_V = F.log_softmax(z_B_T_V.float(), dim=-1)
    logp_B_T = logp_B_T_V.gather(-1, rollouts.completion_ids_B_T[..., None]).squeeze(-1) * mask_B_T
    with torch.no_grad():
        entropy_B_T = -(logp_B_T_V.exp() * logp_B_T_V).sum(-1) * mask_B_T
    return StudentOutputs(logp_B_T=logp_B_T, entropy_B_T=entropy_B_T, hidden_B_T_H=z_B_T_V,
                          lm_head=torch.nn.Identity(), vocab_size=z_B_T_V.shape[-1], softcap=None,
                          chunk_size=chunk_size)


def descent_directions(objective, rollouts: Rollouts, z_B_T_V: torch.Tensor, teacher: TeacherScores,
                       cfg: ObjectiveConfig, chunk_size: int = 1024) -> torch.Tensor:
    """-dL/dz (B, T, V) of an objective-table entry at the student's logits `z_B_T_V` (detached, fp32).

    The objective sees the rollouts, the teacher's scores and the config exactly as the trainer passes them; only
    the student's output layer is replaced by the identity on its logits."""
    z = z_B_T_V.detach().float().requires_grad_(True)
    with torch.enable_grad():
        student = student_outputs_from_logits(rollouts, z, chunk_size)
        loss = objective(rollouts, student, teacher, cfg).loss
        if not loss.requires_grad:  # e.g. every position masked out: no gradient anywhere
            return torch.zeros_like(z)
        (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
    return torch.zeros_like(z) if grad is None else -grad.detach()


def divergences(student_logits_V: torch.Tensor, teacher_logits_V: torch.Tensor) -> dict[str, float]:
    """The cheap screens at one node, over the whole vocabulary: KL(p||q), KL(q||p), JS (beta 0.5) and q's max-p."""
    logp = F.log_softmax(student_logits_V.double(), -1)
    logq = F.log_softmax(teacher_logits_V.double(), -1)
    log_m = torch.logaddexp(logp, logq) - math.log(2)
    js = 0.5 * (logp.exp() * (logp - log_m)).sum() + 0.5 * (logq.exp() * (logq - log_m)).sum()
    return {"kl_student_teacher": float((logp.exp() * (logp - logq)).sum()),
            "kl_teacher_student": float((logq.exp() * (logq - logp)).sum()),
            "js": float(js), "teacher_maxp": float(logq.exp().max())}
