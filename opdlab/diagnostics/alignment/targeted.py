"""Targeted rollouts: the success value V_j of each candidate token at a node (docs/methods.md#gradient-alignment).

At a node (prompt, y_<t) every candidate token j is forced as the t-th completion token and the student continues
n times from there, sampling as in the rollouts (temperature, top-p), until it stops or the rollout's token budget
(`max_new_tokens` completion tokens in all, the forced token included) is spent. Each response
y_<t ⊕ j ⊕ continuation is graded by the task's verifier; V_j is the mean reward of j's n continuations.

These continuations are the whole cost of the diagnostic, so a node's |C| * n continuations are generated as one
batch that shares the prefix: the prefix is run once (batch 1), its KV cache repeated to the batch, and the decode
loop starts from the forced tokens. Rows are generated `max_rows` at a time (the prefix is re-run per slice).

    rewards_C_n = success_values(student, tokenizer, task, problem, prompt_ids, completion_prefix, [17, 42], n=8,
                                 max_new_tokens=96, stops=[eos], generator=g)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opdlab.rollout.builtin import draw, top_p_filter
from opdlab.tasks.base import Task
from opdlab.types import Problem


@torch.no_grad()
def continue_forced(model, prefix_ids_L: torch.Tensor, first_N: torch.Tensor, *, steps: int, stops: Sequence[int],
                    pad: int, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """N continuations of one unpadded prefix, row i starting with the forced token first_N[i] and followed by up
    to `steps` sampled tokens. Returns each row's tokens up to and including its first stop token."""
    device = next(model.parameters()).device
    prefix_ids_L = prefix_ids_L.to(device)
    first_N = first_N.to(device)
    N, L = first_N.shape[0], prefix_ids_L.shape[0]
    stops_t = torch.tensor(list(stops), device=device)
    V = vocab_size or model.get_output_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()
    out = model(input_ids=prefix_ids_L[None], use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(N)  # every row attends to the same prefix keys and values
    tok_N = first_N
    alive_N = ~torch.isin(tok_N, stops_t)
    tokens = [tok_N]
    for step in range(steps):
        if not alive_N.any():
            break
        out = model(input_ids=tok_N[:, None], past_key_values=cache, use_cache=True,
                    position_ids=torch.full((N, 1), L + step, device=device, dtype=torch.long))
        cache = out.past_key_values
        logits_N_V = out.logits[:, -1, :V].float()
        if temperature == 0:
            tok_N = logits_N_V.argmax(-1)
        else:
            probs_N_V = F.softmax(top_p_filter(logits_N_V / temperature, top_p), dim=-1)
            tok_N = draw(probs_N_V, generator)
        tok_N = torch.where(alive_N, tok_N, torch.full_like(tok_N, pad))
        tokens.append(tok_N)
        alive_N = alive_N & ~torch.isin(tok_N, stops_t)
    model.train(was_training)
    rows_N_S = torch.stack(tokens, dim=1).tolist()
    stop_set = set(int(s) for s in stops)
    out_rows = []
    for row in rows_N_S:
        end = next((i for i, tok in enumerate(row) if tok in stop_set), len(row) - 1)
        out_rows.append(row[:end + 1])
    return out_rows


def success_values(model, tokenizer, task: Task, problem: Problem, prompt_ids_P: torch.Tensor,
                   completion_prefix: Sequence[int], candidates: Sequence[int], n: int, *, max_new_tokens: int,
                   stops: Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, vocab_size: int | None = None,
                   max_rows: int = 1024) -> np.ndarray:
    """(C, n) rewards of n targeted rollouts per candidate at the node (prompt, completion_prefix).

    `prompt_ids_P` is the prompt without padding; the verifier sees the decoded completion (special tokens
    skipped), as it does for ordinary rollouts."""
    t = len(completion_prefix)
    if t >= max_new_tokens:
        raise ValueError(f"node at completion position {t} is past the token budget max_new_tokens={max_new_tokens}")
    if n < 1 or not candidates:
        raise ValueError(f"need n >= 1 and at least one candidate, got n={n}, candidates={list(candidates)}")
    device = prompt_ids_P.device
    prefix_ids_L = torch.cat([prompt_ids_P, torch.as_tensor(list(completion_prefix), dtype=torch.long,
                                                            device=device)])
    first_N = torch.as_tensor(list(candidates), dtype=torch.long).repeat_interleave(n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    rows: list[list[int]] = []
    for start in range(0, len(first_N), max_rows):
        rows += continue_forced(model, prefix_ids_L, first_N[start:start + max_rows], steps=max_new_tokens - t - 1,
                                stops=stops, pad=pad, temperature=temperature, top_p=top_p, generator=generator,
                                vocab_size=vocab_size)
    head = list(completion_prefix)
    texts = tokenizer.batch_decode([head + row for row in rows], skip_special_tokens=True)
    rewards = np.array([task.verify(problem, text) for text in texts], dtype=np.float64)
    return rewards.reshape(len(candidates), n)
