"""Packing: several variable-length sequences to one row, so that a forward pass computes no padding.

A batch of rollouts is laid out as left-padded prompts followed by right-padded completions, (B, P+T): every row is
as long as the longest prompt plus the longest completion. On a real model's rollouts (prompts of ~100-150 tokens,
completions from a few tokens to a few hundred) a third or more of that is padding. Packed, the real tokens of the
rows are placed first-fit (longest first) into rows as long as the longest sequence; a block-diagonal causal mask
lets each token see the earlier tokens of its own sequence only, and positions restart at 0 for every sequence, so
each token's hidden state is the one it has in the padded layout (the same sums, up to rounding).
"""
from __future__ import annotations

import torch


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


def packed_final_hidden(model, input_ids_B_L: torch.Tensor, mask_B_L: torch.Tensor) -> torch.Tensor:
    """What `opdlab.models.logprobs.final_hidden` returns, (B, L, H), computed on the rows' real tokens (mask 1)
    packed several to a row; zero at padding positions. Differentiable in the model's parameters."""
    B, L = input_ids_B_L.shape
    device = input_ids_B_L.device
    real_B_L = mask_B_L.bool()
    lengths = real_B_L.sum(1).tolist()
    row_len = max(max(lengths), 1)
    bins = first_fit(lengths, row_len)
    R = len(bins)
    # where each real token goes in the packed (R * row_len) layout; padding positions point past its end
    where_B_L = torch.full((B, L), R * row_len, dtype=torch.long, device=device)
    segment_R_L = torch.arange(R * row_len, device=device).view(R, row_len).neg_().sub_(1)
    pos_R_L = torch.zeros((R, row_len), dtype=torch.long, device=device)
    for r, members in enumerate(bins):
        at = r * row_len
        for k, b in enumerate(sorted(members)):
            n = lengths[b]
            where_B_L[b, real_B_L[b]] = torch.arange(at, at + n, device=device)
            segment_R_L.view(-1)[at:at + n] = k
            pos_R_L.view(-1)[at:at + n] = torch.arange(n, device=device)
            at += n
    ids_flat = torch.zeros(R * row_len, dtype=input_ids_B_L.dtype, device=device)
    ids_flat[where_B_L[real_B_L]] = input_ids_B_L[real_B_L]
    dtype = model.get_output_embeddings().weight.dtype  # the model's (a wrapper may have no .parameters())
    out = model.get_decoder()(input_ids=ids_flat.view(R, row_len), attention_mask=block_causal_mask(segment_R_L, dtype),
                              position_ids=pos_R_L, use_cache=False)
    hidden_N_H = out.last_hidden_state.reshape(R * row_len, -1)
    hidden_N_H = torch.cat([hidden_N_H, hidden_N_H.new_zeros(1, hidden_N_H.shape[1])])  # the padding's zero row
    return hidden_N_H[where_B_L]
