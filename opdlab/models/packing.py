"""Packing: several variable-length sequences computed as one, so that a forward pass computes no padding.

A batch of rollouts is laid out as left-padded prompts followed by right-padded completions, (B, P+T): every row is
as long as the longest prompt plus the longest completion. On a real model's rollouts (prompts of ~100-150 tokens,
completions from a few tokens to a few hundred) a third or more of that is padding, and an SFT batch of worked
solutions of varied length is a quarter padding. `segments_hidden` runs the decoder on the real tokens only, each
sequence seeing the earlier tokens of its own sequence only, its positions restarting at 0, so each token's hidden
state is the one it has alone (the same sums, up to rounding):

- for a Llama-family model (Llama, Mistral, Qwen2, Qwen3, without a sliding window) on PyTorch's SDPA attention
  (transformers' default), all sequences form one row and attention runs sequence by sequence (`varlen_sdpa`,
  registered with transformers as the attention implementation "opdlab_sdpa_varlen", which behaves as "sdpa"
  everywhere else): the products run on exactly the real tokens, and attention costs what each sequence costs
  alone;
- otherwise, the sequences are placed first-fit (longest first) into rows as long as the longest one, under a
  block-diagonal causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTENTION = "opdlab_sdpa_varlen"


def varlen_sdpa(module, query_1_h_N_d, key_1_k_N_d, value_1_k_N_d, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, **kwargs):
    """Transformers' SDPA attention, except that given `cu_seq_lens_q` (the sequences' start offsets and the total,
    as flash-attention's variable-length kernels take them) the one row holds several sequences and each attends
    causally to itself only. Returns (1, N, heads, head_dim) and no weights, as transformers' attention functions."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query_1_h_N_d, key_1_k_N_d, value_1_k_N_d, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None or query_1_h_N_d.shape[0] != 1 or kwargs.get("softcap") is not None:
        raise ValueError("varlen attention takes one row of sequences without a mask and without softcapping")
    bounds = bounds.tolist()
    gqa = query_1_h_N_d.shape[1] != key_1_k_N_d.shape[1]
    scale = query_1_h_N_d.shape[-1] ** -0.5 if scaling is None else scaling
    products = _products_faster(query_1_h_N_d, [e - s for s, e in zip(bounds[:-1], bounds[1:])], dropout)
    parts = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query_1_h_N_d[0, :, s:e], key_1_k_N_d[0, :, s:e], value_1_k_N_d[0, :, s:e]
        if products:
            parts.append(_causal_attention_by_products(q, k, v, scale).to(q.dtype))
        else:
            parts.append(F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True,
                                                        scale=scale, enable_gqa=gqa)[0])
    return torch.cat(parts, dim=1).transpose(0, 1)[None].contiguous(), None


# On a CPU, PyTorch's fused attention kernel is slow in bf16 without AMX: over 16 sequences of ~240 tokens (9 heads
# of 64, 3 key/value heads) its forward and backward took 99 ms a layer, against 63 ms for the two products in bf16
# with an fp32 softmax between them (bench/sft_step.py's workload, 2-core AMD EPYC with AVX512-BF16). The products
# keep each sequence's (heads, n, n) probabilities for the backward (6 bytes an entry: fp32 and their bf16 copy),
# where the kernel keeps O(n); they are used only while a layer's call keeps at most this much.
PRODUCTS_MAX_BYTES = 128 * 2**20


def _products_faster(query_1_h_N_d: torch.Tensor, lengths: list[int], dropout: float) -> bool:
    held = 6 * query_1_h_N_d.shape[1] * sum(n * n for n in lengths)
    return (query_1_h_N_d.device.type == "cpu" and held <= PRODUCTS_MAX_BYTES and dropout == 0.0
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _causal_attention_by_products(query_h_n_d, key_k_n_d, value_k_n_d, scale: float) -> torch.Tensor:
    """Causal attention of one sequence as two batched products in bf16 with the softmax in fp32 between them;
    the query heads that share a key/value head are stacked into one product. Returns (heads, n, head_dim)."""
    h, n, d = query_h_n_d.shape
    kv = key_k_n_d.shape[0]
    future_n_n = torch.ones(n, n, dtype=torch.bool, device=query_h_n_d.device).triu_(1)
    q_k_Gn_d = query_h_n_d.to(torch.bfloat16).reshape(kv, (h // kv) * n, d)
    scores_k_G_n_n = (q_k_Gn_d @ key_k_n_d.to(torch.bfloat16).transpose(1, 2)).float().view(kv, h // kv, n, n)
    probs_k_Gn_n = scores_k_G_n_n.mul(scale).masked_fill(future_n_n, float("-inf")).softmax(-1).view(kv, -1, n)
    return (probs_k_Gn_n.to(torch.bfloat16) @ value_k_n_d.to(torch.bfloat16)).view(h, n, d)


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)


# Models whose attention is Llama's (no logit soft-capping, no sinks, no per-layer windows) and so can take bounds.
VARLEN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def sliding_window(cfg) -> int | None:
    """The attention window a model's config sets (Mistral's `sliding_window`; Qwen's where `use_sliding_window`)."""
    if cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False):
        return getattr(cfg, "sliding_window", None)
    return None


def _varlen_ready(model) -> bool:
    """Switch a Llama-family model on SDPA attention without a sliding window to the variable-length
    implementation (the same function where no sequence bounds are given); True when its attention runs on
    bounds."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if getattr(cfg, "model_type", None) not in VARLEN_MODEL_TYPES or sliding_window(cfg) is not None:
        return False
    impl = getattr(cfg, "_attn_implementation", None)
    if impl == "sdpa" and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(VARLEN_ATTENTION)
        impl = cfg._attn_implementation
    return impl == VARLEN_ATTENTION


def first_fit(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `row_len` tokens: first fit, longest first (ties in
    index order); within a row, indices are in the order placed."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([]), room.append(row_len)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= n
    return bins


def block_causal_mask(segment_R_L: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (R, 1, L, L) mask in `dtype`: position j is visible from i when j <= i and both carry the same
    segment id (give every padding position an id of its own, so it sees only itself)."""
    L = segment_R_L.shape[1]
    causal_L_L = torch.ones(L, L, dtype=torch.bool, device=segment_R_L.device).tril_()
    allowed = (segment_R_L[:, :, None] == segment_R_L[:, None, :]) & causal_L_L
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_R_L.device)[:, None].masked_fill_(
        ~allowed[:, None], torch.finfo(dtype).min)


def segments_hidden(model, input_ids_N: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The decoder's final hidden states, (N, H), for sequences of `lengths` laid end to end in `input_ids_N`,
    each computed as if it were alone. Differentiable in the model's parameters."""
    device = input_ids_N.device
    if sum(lengths) != input_ids_N.shape[0] or min(lengths, default=1) < 1:
        raise ValueError(f"lengths {lengths} do not split {input_ids_N.shape[0]} tokens into non-empty sequences")
    pos_N = torch.cat([torch.arange(n, device=device) for n in lengths])
    if _varlen_ready(model):
        bounds_S1 = torch.tensor([0] + lengths, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(lengths)
        # an all-ones padding mask: no (N, N) mask is built and no packed sequences are inferred from the positions
        out = model.get_decoder()(input_ids=input_ids_N[None], attention_mask=torch.ones_like(input_ids_N)[None],
                                  position_ids=pos_N[None], use_cache=False, cu_seq_lens_q=bounds_S1,
                                  cu_seq_lens_k=bounds_S1, max_length_q=longest, max_length_k=longest)
        return out.last_hidden_state[0]
    row_len = max(lengths)
    bins = first_fit(lengths, row_len)
    R, starts = len(bins), [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    # where each token goes in the (R * row_len) layout
    where_N = torch.empty(len(pos_N), dtype=torch.long, device=device)
    segment_R_L = torch.arange(R * row_len, device=device).view(R, row_len).neg_().sub_(1)  # padding: its own id
    pos_R_L = torch.zeros((R, row_len), dtype=torch.long, device=device)
    for r, members in enumerate(bins):
        at = r * row_len
        for k, i in enumerate(sorted(members)):
            n = lengths[i]
            where_N[starts[i]:starts[i] + n] = torch.arange(at, at + n, device=device)
            segment_R_L.view(-1)[at:at + n] = k
            pos_R_L.view(-1)[at:at + n] = pos_N[starts[i]:starts[i] + n]
            at += n
    ids_R_L = torch.zeros(R * row_len, dtype=input_ids_N.dtype, device=device)
    ids_R_L[where_N] = input_ids_N
    dtype = model.get_output_embeddings().weight.dtype  # the model's (a wrapper may have no .parameters())
    out = model.get_decoder()(input_ids=ids_R_L.view(R, row_len),
                              attention_mask=block_causal_mask(segment_R_L, dtype), position_ids=pos_R_L,
                              use_cache=False)
    return out.last_hidden_state.reshape(R * row_len, -1)[where_N]


def packed_final_hidden(model, input_ids_B_L: torch.Tensor, mask_B_L: torch.Tensor) -> torch.Tensor:
    """What `opdlab.models.logprobs.final_hidden` returns, (B, L, H), computed on the rows' real tokens (mask 1)
    only (`segments_hidden`); zero at padding positions. Differentiable in the model's parameters."""
    real_B_L = mask_B_L.bool()
    lengths = real_B_L.sum(1).tolist()
    rows = [b for b, n in enumerate(lengths) if n > 0]
    if not rows:
        width = model.get_output_embeddings().weight.shape[1]
        return torch.zeros(*input_ids_B_L.shape, width, device=input_ids_B_L.device)
    hidden_N_H = segments_hidden(model, input_ids_B_L[real_B_L], [lengths[b] for b in rows])
    out_B_L_H = hidden_N_H.new_zeros(*input_ids_B_L.shape, hidden_N_H.shape[-1])
    return out_B_L_H.index_put((real_B_L,), hidden_N_H)
