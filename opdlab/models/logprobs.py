"""Per-token log-probabilities from hidden states, in chunks over positions.

A (B, T, V) fp32 logit tensor for a 150k vocabulary and 4k tokens is 2.4 GB per sequence, so nothing here ever
holds it: the last hidden states are kept, and logits are made `chunk_size` positions at a time (only for positions
that are part of a completion). With gradients, each chunk is recomputed in the backward pass
(activation checkpointing), so the peak stays at one chunk's logits there too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opdlab.models.packing import packed_final_hidden
from opdlab.models.prompts import position_ids
from opdlab.types import StudentOutputs


def final_hidden(model, input_ids_B_L: torch.Tensor, mask_B_L: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm), without computing logits."""
    out = model.get_decoder()(input_ids=input_ids_B_L, attention_mask=mask_B_L, position_ids=position_ids(mask_B_L),
                              use_cache=False)
    return out.last_hidden_state


def chunk_logits(hidden_N_H: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, softcap: float | None = None):
    logits_N_V = lm_head(hidden_N_H)[:, :vocab_size].float()
    if softcap:  # Gemma-style final logit soft-capping
        logits_N_V = torch.tanh(logits_N_V / softcap) * softcap
    return logits_N_V


def _stats_chunk(hidden_N_H, targets_N, lm_head, vocab_size, softcap, top_k):
    logp_N_V = F.log_softmax(chunk_logits(hidden_N_H, lm_head, vocab_size, softcap), dim=-1)
    logp_N = logp_N_V.gather(-1, targets_N[:, None]).squeeze(-1)
    with torch.no_grad():
        p_N_V = logp_N_V.exp()
        maxp_N = p_N_V.max(-1).values
        entropy_N = -p_N_V.mul_(logp_N_V).sum(-1)  # in place: one (N, V) tensor fewer at the peak
        if top_k:
            topk_logp_N_K, topk_ids_N_K = logp_N_V.topk(top_k, dim=-1)
        else:  # new empty tensors: an empty view of logp_N_V would keep the chunk's (N, V) storage alive
            topk_logp_N_K = logp_N_V.new_zeros(len(targets_N), 0)
            topk_ids_N_K = targets_N.new_zeros(len(targets_N), 0)
    return logp_N, entropy_N, maxp_N, topk_ids_N_K, topk_logp_N_K


def token_stats(hidden_N_H: torch.Tensor, targets_N: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, *,
                top_k: int = 0, chunk_size: int = 1024, softcap: float | None = None):
    """log p(target), entropy, max-prob, top-K ids and log-probs for N positions, `chunk_size` at a time.

    Differentiable in `hidden_N_H` through log p(target) only; the other statistics are detached.
    """
    parts = []
    grad = torch.is_grad_enabled() and hidden_N_H.requires_grad
    for start in range(0, hidden_N_H.shape[0], chunk_size):
        args = (hidden_N_H[start:start + chunk_size], targets_N[start:start + chunk_size], lm_head, vocab_size,
                softcap, top_k)
        parts.append(checkpoint(_stats_chunk, *args, use_reentrant=False) if grad else _stats_chunk(*args))
    if not parts:  # fp32 as the chunks' statistics are (a bf16 hidden state must not make these bf16: an objective
        # writes its fp32 statistics into them, `TeacherScores.fill_pending`)
        empty = hidden_N_H.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty, targets_N.new_zeros(0, top_k), hidden_N_H.new_zeros(0, top_k, dtype=torch.float32)
    return tuple(torch.cat(p, dim=0) for p in zip(*parts))


def completion_hidden(model, prompt_ids_B_P, prompt_mask_B_P, completion_ids_B_T, completion_mask_B_T,
                      packing: bool = False):
    """Hidden states that predict each completion token: position P-1+t predicts y_t. Returns (B, T, H).
    `packing`: the forward runs on the rows' real tokens only (`opdlab.models.packing`), with
    the same hidden states up to rounding, zero where the predicting position is padding."""
    ids = torch.cat([prompt_ids_B_P, completion_ids_B_T], dim=1)
    mask = torch.cat([prompt_mask_B_P, completion_mask_B_T], dim=1)
    hidden_B_L_H = (packed_final_hidden if packing else final_hidden)(model, ids, mask)
    P, T = prompt_ids_B_P.shape[1], completion_ids_B_T.shape[1]
    return hidden_B_L_H[:, P - 1:P - 1 + T]


def softcap_of(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def scatter_back(values_N: torch.Tensor, mask_B_T: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Put per-position values computed on mask_B_T's true entries back into a (B, T, ...) tensor."""
    out = values_N.new_full((*mask_B_T.shape, *values_N.shape[1:]), fill)
    out[mask_B_T] = values_N
    return out


def student_forward(model, rollouts, vocab_size: int, chunk_size: int = 1024, packing: bool = False) -> StudentOutputs:
    """The student's differentiable log-probs of its sampled tokens (plus detached entropy); `packing` as in
    `completion_hidden`."""
    hidden_B_T_H = completion_hidden(model, rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P,
                                     rollouts.completion_ids_B_T, rollouts.completion_mask_B_T, packing=packing)
    mask_B_T = rollouts.completion_mask_B_T.bool()
    logp_N, ent_N, _, _, _ = token_stats(
        hidden_B_T_H[mask_B_T], rollouts.completion_ids_B_T[mask_B_T], model.get_output_embeddings(), vocab_size,
        chunk_size=chunk_size, softcap=softcap_of(model))
    return StudentOutputs(
        logp_B_T=scatter_back(logp_N, mask_B_T), entropy_B_T=scatter_back(ent_N, mask_B_T),
        hidden_B_T_H=hidden_B_T_H, lm_head=model.get_output_embeddings(), vocab_size=vocab_size,
        softcap=softcap_of(model), chunk_size=chunk_size)


GRAD_W_BLOCK = 4096  # positions whose logit gradients are held at once (bf16 (4096, V): 1.2 GB at V = 152k)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden_N_H @ weight_V_H.T` (optionally soft-capped) against `targets_N`, whose
    gradients are made in the forward pass (where grad mode is on), `chunk_size` positions at a time: no (N, V)
    fp32 logits or log-probabilities are held, the logits' gradient only for GRAD_W_BLOCK positions at a time (in
    the products' dtype), and each chunk's temporaries are small enough to be reused rather than mapped fresh (on a
    CPU, glibc maps a block over 32 MB anew, and the kernel zero-fills its pages, on every allocation). The products
    run in autocast's dtype where autocast is on, the softmax in fp32, as `chunk_logits` does."""

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, targets_N, chunk_size: int, softcap: float | None, grad_mode: bool):
        device_type = hidden_N_H.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden_N_H.dtype
        # (needs_input_grad is set under no_grad too: the caller's grad mode says whether to make gradients)
        need_h, need_w = (grad_mode and need for need in ctx.needs_input_grad[:2])
        with torch.autocast(device_type, enabled=False):
            h_N_H, w_V_H = hidden_N_H.to(dtype), weight_V_H.to(dtype)
            N = h_N_H.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h_N_H.device)
            grad_h_N_H = torch.empty_like(hidden_N_H) if need_h else None
            grad_w_V_H = torch.zeros_like(weight_V_H, dtype=torch.float32) if need_w else None
            # the logits' gradient for up to `flush` positions, multiplied into the weight's gradient at once
            flush = max(chunk_size, (GRAD_W_BLOCK // chunk_size) * chunk_size)
            dlogits_F_V = h_N_H.new_empty(min(N, flush), w_V_H.shape[0]) if need_w else None
            for s in range(0, N, chunk_size):
                y_C = targets_N[s:s + chunk_size]
                z_C_V = (h_N_H[s:s + chunk_size] @ w_V_H.T).float()
                if softcap:
                    t_C_V = z_C_V.div_(softcap).tanh_()
                    z_C_V = t_C_V * softcap
                lse_C = torch.logsumexp(z_C_V, dim=-1)
                total += (lse_C - z_C_V.gather(1, y_C[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                g_C_V = z_C_V.sub_(lse_C[:, None]).exp_()  # softmax, in place of the logits
                g_C_V[torch.arange(len(y_C), device=y_C.device), y_C] -= 1
                if softcap:  # d(c tanh(z / c)) / dz = 1 - tanh^2
                    g_C_V.mul_(1 - t_C_V.square_())
                g_C_V = g_C_V.to(dtype)
                if need_h:
                    grad_h_N_H[s:s + chunk_size] = g_C_V @ w_V_H
                if need_w:
                    block, end = s - s % flush, s + len(y_C)
                    dlogits_F_V[s - block:end - block] = g_C_V
                    if end - block == flush or end == N:
                        grad_w_V_H += dlogits_F_V[:end - block].T @ h_N_H[block:end]
            if need_w:
                grad_w_V_H = grad_w_V_H.to(weight_V_H.dtype)
        ctx.save_for_backward(grad_h_N_H, grad_w_V_H)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h_N_H, grad_w_V_H = ctx.saved_tensors
        return (None if grad_h_N_H is None else grad_h_N_H * grad_total,
                None if grad_w_V_H is None else grad_w_V_H * grad_total, None, None, None, None)


def linear_cross_entropy(hidden_N_H: torch.Tensor, lm_head: torch.nn.Module, targets_N: torch.Tensor,
                         vocab_size: int, softcap: float | None = None, chunk_size: int = 128) -> torch.Tensor:
    """The summed next-token cross-entropy `F.cross_entropy(chunk_logits(hidden_N_H, ...), targets_N,
    reduction="sum")`, computed without ever holding the (N, V) logits (`_LinearCrossEntropy`). An output layer
    that is not a plain bias-free Linear goes through `chunk_logits` instead, a chunk at a time, each chunk
    recomputed in the backward pass."""
    weight = getattr(lm_head, "weight", None)
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None and weight is not None:
        return _LinearCrossEntropy.apply(hidden_N_H, weight[:vocab_size], targets_N, chunk_size, softcap,
                                         torch.is_grad_enabled())

    def chunk_loss(h_C_H, y_C):
        return F.cross_entropy(chunk_logits(h_C_H, lm_head, vocab_size, softcap), y_C, reduction="sum")

    total = hidden_N_H.new_zeros((), dtype=torch.float32)
    several = len(targets_N) > chunk_size and torch.is_grad_enabled()
    for start in range(0, len(targets_N), chunk_size):
        args = (hidden_N_H[start:start + chunk_size], targets_N[start:start + chunk_size])
        total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if several else chunk_loss(*args))
    return total
