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
    if not parts:
        empty = hidden_N_H.new_zeros(0)
        return empty, empty, empty, targets_N.new_zeros(0, top_k), hidden_N_H.new_zeros(0, top_k)
    return tuple(torch.cat(p, dim=0) for p in zip(*parts))


def completion_hidden(model, prompt_ids_B_P, prompt_mask_B_P, completion_ids_B_T, completion_mask_B_T,
                      packing: bool = False):
    """Hidden states that predict each completion token: position P-1+t predicts y_t. Returns (B, T, H).
    `packing`: the forward runs on the rows' real tokens packed several to a row (`opdlab.models.packing`), with
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
