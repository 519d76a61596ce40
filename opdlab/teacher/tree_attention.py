"""Entropy-triggered tree attention: the teacher scores a rollout and every candidate leaf of it, segment by segment.

The lookahead objective (docs/methods.md#lookahead-group-reward-lgr) needs, at each trigger position t of a rollout and
for each of K candidate tokens v_k, the teacher's next-token distribution one step ahead, pi_T(. | x, y_<t, v_k). A
naive scorer runs one forward over (x, y_<t, v_k) per candidate: |S| * K forwards over prefixes of length up to L. Here
each candidate is a *leaf*: one token placed at y_t's position id that attends to the rollout's positions < t (prompt
included, padding excluded) and to itself, and to nothing else, so its output is exactly the teacher's output for
(x, y_<t, v_k), while the rollout itself is run once.

Long rollouts are cut into segments of `segment_len` completion positions (the first also carries the prompt).
Per segment, one forward runs the segment's rollout tokens on top of the KV cache of everything before it (the
ordinary scoring forward, done in pieces; its hidden states are the rollout's teacher scores), then one forward
(more only past a memory budget) runs all leaves of the segment's trigger positions as a batch on top of that cache,
with a custom 4-D attention mask (rows, 1, leaves, cached + leaves). Leaves are batched in rows of up to m trigger
positions of one rollout (m = the mean number of trigger positions per rollout in the segment, capped as
`MAX_LEAVES_PER_ROW` says), each row with a copy of its rollout's cache rows, so rollouts with many triggers do not
pad every other rollout up to their count. Peak memory: the rollout's KV cache, one segment's activations, and one
leaf batch's gathered cache (`leaf_cache_tokens`).

Works for decoder-only transformers models whose decoder takes a prepared 4-D mask, with `attn_implementation`
'sdpa' or 'eager' (an additive float mask: eager adds it to the scores, and sdpa would make one from a boolean mask
in every layer); tested against a naive forward per candidate on LlamaForCausalLM and Qwen2ForCausalLM
(tests/test_tree_attention.py). Sliding-window layers are refused: the custom mask would override their window.

    from opdlab.teacher.tree_attention import tree_forward
    hidden_B_T_H, leaf_out_B_T_K_F = tree_forward(teacher, prompt_ids, prompt_mask, completion_ids,
                                                  completion_mask, trigger_B_T, leaf_ids_B_T_K, leaf_fn)

`lookahead_scores` (what `opdlab.teacher.scoring.score` calls for the lookahead objective) picks the trigger positions
and candidates from the student and turns the leaves' distributions into candidate rewards.

[R] marks a reconstruction: a detail the source paper's text leaves open, chosen here and explained in
docs/methods.md#reconstructions.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from opdlab.models.logprobs import chunk_logits, completion_hidden, softcap_of
from opdlab.models.prompts import position_ids
from opdlab.types import LookaheadRequest, Rollouts

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Confidence signals, best first in the paper's ablation; `confidence_reward` says how each is computed.
SIGNALS = ("max_p", "sampled_p", "neg_entropy", "perplexity")
# Leaves per batch row of a leaf forward: at most MAX_LEAVES_PER_ROW and one per CACHED_PER_LEAF cached positions.
# Every row costs a copy of its rollout's KV cache, so wider rows copy less per leaf, but each leaf also computes
# (masked) attention to every other leaf of its row: past C / 4 leaves that costs more than the copy saves.
MAX_LEAVES_PER_ROW = 256
CACHED_PER_LEAF = 4


def _check_model(model) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"tree attention needs a custom 4-D attention mask, which opdlab passes for "
                         f"attn_implementation in {SUPPORTED_ATTENTION}; this model uses {impl!r} "
                         f"(load it with attn_implementation='sdpa')")
    layer_types = getattr(model.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"tree attention supports full-attention layers only; this model's layer types include "
                         f"{sorted(set(layer_types) - {'full_attention'})} (a custom mask would override the window)")


def _leaf_mask(valid_R_C: torch.Tensor, ctx_R_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (R, 1, N, C + N) mask: leaf n of row r sees the cached non-padding keys before index ctx_R_N[r, n]
    and itself. A dummy leaf (ctx 0) sees only itself, so no softmax row is empty."""
    R, C = valid_R_C.shape
    N = ctx_R_N.shape[1]
    keys_C = torch.arange(C, device=valid_R_C.device)
    cached_R_N_C = (keys_C[None, None, :] < ctx_R_N[:, :, None]) & valid_R_C[:, None, :]
    self_N_N = torch.eye(N, dtype=torch.bool, device=valid_R_C.device).expand(R, N, N)
    allowed = torch.cat([cached_R_N_C, self_N_N], dim=2)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                         torch.finfo(dtype).min)


def _gathered(cache: DynamicCache, rows_R: torch.Tensor) -> DynamicCache:
    """A cache holding rows `rows_R` of `cache` (a row may repeat), built without the extra copy that filling a new
    cache through `update` makes."""
    out = DynamicCache()
    out.layers = []
    for layer in cache.layers:
        keys, values = layer.keys.index_select(0, rows_R), layer.values.index_select(0, rows_R)
        new = type(layer)()
        new.lazy_initialization(keys, values)
        new.keys, new.values = keys, values
        out.layers.append(new)
    return out


def _score_leaves(decoder, cache: DynamicCache, dtype, mask_B_L, pos_B_L, rows_n, seq_n, leaf_ids_n_K, leaf_fn,
                  leaf_cache_tokens: int) -> torch.Tensor:
    """leaf_fn of the leaves leaf_ids_n_K[i], each in place of the token at sequence index seq_n[i] of rollout
    rows_n[i], on top of `cache` (which holds every rollout's first C >= max(seq_n) positions). Returns (n, K, F)."""
    n, K = leaf_ids_n_K.shape
    C = cache.get_seq_length()
    # leaf rows: up to m consecutive trigger positions of one rollout
    per_rollout = torch.bincount(rows_n)
    m = max(1, min(MAX_LEAVES_PER_ROW // K, C // (CACHED_PER_LEAF * K), math.ceil(n / int((per_rollout > 0).sum()))))
    rank_n = torch.arange(n, device=rows_n.device) - (per_rollout.cumsum(0) - per_rollout)[rows_n]
    leaf_row_n = torch.unique_consecutive(rows_n * (n + 1) + rank_n // m, return_inverse=True)[1]
    R = int(leaf_row_n[-1]) + 1
    source_R = torch.zeros(R, dtype=torch.long, device=rows_n.device).index_copy_(0, leaf_row_n, rows_n)
    slots_n_K = (rank_n % m)[:, None] * K + torch.arange(K, device=rows_n.device)
    out_n_K_F = None
    per_pass = max(1, leaf_cache_tokens // max(C, 1))
    for r0 in range(0, R, per_pass):
        r1 = min(R, r0 + per_pass)
        sel_n = (leaf_row_n >= r0) & (leaf_row_n < r1)
        src_R = source_R[r0:r1]
        r_i, slots_i_K = leaf_row_n[sel_n] - r0, slots_n_K[sel_n]
        ids_R_N = leaf_ids_n_K.new_zeros(r1 - r0, m * K)
        pos_R_N = pos_B_L.new_zeros(r1 - r0, m * K)
        ctx_R_N = pos_B_L.new_zeros(r1 - r0, m * K)
        ids_R_N[r_i[:, None], slots_i_K] = leaf_ids_n_K[sel_n]
        pos_R_N[r_i[:, None], slots_i_K] = pos_B_L[rows_n[sel_n], seq_n[sel_n]][:, None]
        ctx_R_N[r_i[:, None], slots_i_K] = seq_n[sel_n][:, None]
        out = decoder(input_ids=ids_R_N, attention_mask=_leaf_mask(mask_B_L[src_R, :C], ctx_R_N, dtype),
                      position_ids=pos_R_N, past_key_values=_gathered(cache, src_R), use_cache=True)
        h_R_N_H = out.last_hidden_state
        feats_i_K_F = leaf_fn(h_R_N_H[r_i[:, None], slots_i_K].reshape(-1, h_R_N_H.shape[-1])).reshape(
            len(r_i), K, -1)
        if out_n_K_F is None:
            out_n_K_F = feats_i_K_F.new_zeros(n, K, feats_i_K_F.shape[-1])
        out_n_K_F[sel_n] = feats_i_K_F
    return out_n_K_F


@torch.no_grad()
def tree_forward(model, prompt_ids_B_P: torch.Tensor, prompt_mask_B_P: torch.Tensor,
                 completion_ids_B_T: torch.Tensor, completion_mask_B_T: torch.Tensor, trigger_B_T: torch.Tensor,
                 leaf_ids_B_T_K: torch.Tensor, leaf_fn: Callable[[torch.Tensor], torch.Tensor], *,
                 segment_len: int = 256, leaf_cache_tokens: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's hidden states and `leaf_fn` of every leaf's, segment by segment.

    Prompts are left-padded and completions right-padded, as in `Rollouts`. At each position where trigger_B_T is
    True, the K tokens leaf_ids_B_T_K[b, t] are scored as leaves in y_t's place. `leaf_fn` maps the leaves' last
    hidden states (n, H) to per-leaf features (n, F), e.g. their log-probs or confidence statistics.
    `leaf_cache_tokens` caps (leaf rows in one forward) x (cached positions each), i.e. the gathered KV cache.

    Returns (hidden_B_T_H, out_B_T_K_F): hidden_B_T_H[b, t] is the hidden state that predicts y_t (as
    `opdlab.models.logprobs.completion_hidden`); out_B_T_K_F[b, t, k] is leaf_fn of the hidden state after
    (x, y_<t, leaf_ids[b, t, k]), zero where there is no trigger."""
    _check_model(model)
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    B, P = prompt_ids_B_P.shape
    T, K = completion_ids_B_T.shape[1], leaf_ids_B_T_K.shape[-1]
    if trigger_B_T.shape != (B, T) or leaf_ids_B_T_K.shape[:2] != (B, T):
        raise ValueError(f"trigger_B_T {tuple(trigger_B_T.shape)} and leaf_ids_B_T_K "
                         f"{tuple(leaf_ids_B_T_K.shape)} must match the completions' (B, T) = {(B, T)}")
    trigger_B_T = trigger_B_T.bool() & completion_mask_B_T.bool()
    ids_B_L = torch.cat([prompt_ids_B_P, completion_ids_B_T], dim=1)
    mask_B_L = torch.cat([prompt_mask_B_P, completion_mask_B_T], dim=1)
    pos_B_L = position_ids(mask_B_L)
    decoder = model.get_decoder()
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    hidden_parts, out_B_T_K_F = [], None
    for s in range(0, T, segment_len):
        e = min(T, s + segment_len)
        a, b = (0 if s == 0 else P + s), P + e
        out = decoder(input_ids=ids_B_L[:, a:b], attention_mask=mask_B_L[:, :b], position_ids=pos_B_L[:, a:b],
                      past_key_values=cache, use_cache=True)
        hidden_parts.append(out.last_hidden_state)
        rows_n, cols_n = trigger_B_T[:, s:e].nonzero(as_tuple=True)  # row-major: each rollout's in order
        if len(rows_n):
            feats_n_K_F = _score_leaves(decoder, cache, dtype, mask_B_L.bool(), pos_B_L, rows_n, P + s + cols_n,
                                        leaf_ids_B_T_K[rows_n, s + cols_n], leaf_fn, leaf_cache_tokens)
            if out_B_T_K_F is None:
                out_B_T_K_F = feats_n_K_F.new_zeros(B, T, K, feats_n_K_F.shape[-1])
            out_B_T_K_F[rows_n, s + cols_n] = feats_n_K_F
    hidden_B_L_H = torch.cat(hidden_parts, dim=1)
    if out_B_T_K_F is None:  # no trigger anywhere: learn F's width from an empty call
        empty = leaf_fn(hidden_B_L_H.new_zeros(0, hidden_B_L_H.shape[-1]))
        out_B_T_K_F = empty.new_zeros(B, T, K, empty.shape[-1])
    return hidden_B_L_H[:, P - 1:P - 1 + T], out_B_T_K_F


def leaf_confidence(lm_head: torch.nn.Module, vocab_size: int, softcap: float | None = None,
                    chunk_size: int = 1024) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `leaf_fn` giving (n, 3) [max_v p(v), sum_v p(v)^2, entropy] of each leaf's next-token distribution p,
    made `chunk_size` leaves at a time (never (n, V) at once)."""
    def fn(hidden_n_H: torch.Tensor) -> torch.Tensor:
        parts = [hidden_n_H.new_zeros(0, 3, dtype=torch.float32)]
        for start in range(0, hidden_n_H.shape[0], chunk_size):
            logp_C_V = F.log_softmax(chunk_logits(hidden_n_H[start:start + chunk_size], lm_head, vocab_size,
                                                  softcap), dim=-1)
            p_C_V = logp_C_V.exp()
            parts.append(torch.stack([p_C_V.max(-1).values, p_C_V.square().sum(-1),
                                      -(p_C_V * logp_C_V).sum(-1)], dim=-1))
        return torch.cat(parts)
    return fn


def confidence_reward(stats_N_3: torch.Tensor, signal: str) -> torch.Tensor:
    """A candidate's raw reward from its leaf's [max-p, sum p^2, entropy] (higher = the teacher more confident):

        max_p        max_v pi_T(v | x, y_<t, v_k)                       (the paper's; the default)
        sampled_p    E_{u ~ pi_T}[pi_T(u | ...)] = sum_v pi_T(v | ...)^2: the expected probability of a token
                     sampled from the teacher at the leaf, computed exactly instead of from one draw   [R]
        neg_entropy  -H(pi_T(. | x, y_<t, v_k))
        perplexity   -exp(H): minus the perplexity, so that lower perplexity is a higher reward   [R]
    """
    maxp, sumsq, entropy = stats_N_3.unbind(-1)
    if signal == "max_p":
        return maxp
    if signal == "sampled_p":
        return sumsq
    if signal == "neg_entropy":
        return -entropy
    if signal == "perplexity":
        return -entropy.exp()
    raise ValueError(f"unknown lookahead confidence signal {signal!r}; allowed: {', '.join(SIGNALS)}")


@torch.no_grad()
def student_candidates(student, rollouts: Rollouts, k: int, tau: float, vocab_size: int,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(trigger_B_T, ids_B_T_K): loss positions where the student's entropy H(pi_theta(. | c_t)) exceeds tau, and
    the student's top-k tokens at every loss position (zeros elsewhere), from one no-grad student forward."""
    if not 1 <= k <= vocab_size:
        raise ValueError(f"lookahead top-K must be in [1, vocabulary size {vocab_size}], got {k}")
    device = next(student.parameters()).device
    loss_B_T = rollouts.loss_mask_B_T.to(device).bool()
    hidden_N_H = completion_hidden(student, rollouts.prompt_ids_B_P.to(device), rollouts.prompt_mask_B_P.to(device),
                                   rollouts.completion_ids_B_T.to(device),
                                   rollouts.completion_mask_B_T.to(device))[loss_B_T]
    lm_head, softcap = student.get_output_embeddings(), softcap_of(student)
    ents, ids = [hidden_N_H.new_zeros(0)], [loss_B_T.new_zeros(0, k, dtype=torch.long)]
    for start in range(0, hidden_N_H.shape[0], chunk_size):
        logp_C_V = F.log_softmax(chunk_logits(hidden_N_H[start:start + chunk_size], lm_head, vocab_size, softcap),
                                 dim=-1)
        ents.append(-(logp_C_V.exp() * logp_C_V).sum(-1))
        ids.append(logp_C_V.topk(k, dim=-1).indices)
    trigger_B_T = torch.zeros_like(loss_B_T)
    trigger_B_T[loss_B_T] = torch.cat(ents) > tau
    ids_B_T_K = torch.zeros(*loss_B_T.shape, k, dtype=torch.long, device=device)
    ids_B_T_K[loss_B_T] = torch.cat(ids)
    return trigger_B_T, ids_B_T_K


@torch.no_grad()
def lookahead_scores(teacher, student, rollouts: Rollouts, prompt_ids_B_P: torch.Tensor,
                     prompt_mask_B_P: torch.Tensor, request: LookaheadRequest, vocab_size: int,
                     chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's completion hidden states (B, T, H) and the `TeacherScores.lookahead_*` fields.

    The student proposes (trigger positions and its top-K there, `student_candidates`); the teacher scores every
    candidate one step ahead in the same passes that score the rollout (`tree_forward`); each candidate's raw reward
    is `confidence_reward` of the leaf's distribution under `request.signal`."""
    if student is None:
        raise ValueError("lookahead scoring needs the student, which proposes the candidates: "
                         "score(..., lookahead=request, student=student_model)")
    if not isinstance(teacher, torch.nn.Module):
        raise ValueError(f"lookahead scoring runs the teacher's layers with a custom attention mask, so it needs the "
                         f"teacher model in this process; got a {type(teacher).__name__} (a remote teacher cannot "
                         f"score candidate leaves)")
    device = next(teacher.parameters()).device
    trigger_B_T, ids_B_T_K = student_candidates(student, rollouts, request.k, request.tau, vocab_size, chunk_size)
    trigger_B_T, ids_B_T_K = trigger_B_T.to(device), ids_B_T_K.to(device)
    leaf_fn = leaf_confidence(teacher.get_output_embeddings(), vocab_size, softcap_of(teacher), chunk_size)
    hidden_B_T_H, stats_B_T_K_3 = tree_forward(
        teacher, prompt_ids_B_P.to(device), prompt_mask_B_P.to(device), rollouts.completion_ids_B_T.to(device),
        rollouts.completion_mask_B_T.to(device), trigger_B_T, ids_B_T_K, leaf_fn, segment_len=request.segment_len)
    reward_B_T_K = confidence_reward(stats_B_T_K_3, request.signal) * trigger_B_T[..., None]
    return hidden_B_T_H, {"lookahead_trigger_B_T": trigger_B_T, "lookahead_ids_B_T_K": ids_B_T_K,
                          "lookahead_reward_B_T_K": reward_B_T_K}
