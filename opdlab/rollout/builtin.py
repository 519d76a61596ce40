"""Batched sampling from a causal LM with a KV cache.

A plain decode loop over `model(...)` with the model's own cache, so it works for any transformers causal LM and
records, per sampled token, both the policy's log-probability (temperature 1, no truncation: log pi_old) and the
log-probability under the distribution actually sampled from (temperature, top-p).

`reference_rollouts` packs given responses (a task's reference solutions, for GKD's off-policy batches) into the
same `Rollouts` shape, with log pi_old = the student's own log-probs of those tokens.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import StaticCache

from opdlab.models.logprobs import student_forward
from opdlab.models.prompts import encode_prompts, position_ids, render_prompt, stop_token_ids
from opdlab.rollout.lean import LeanDecoder
from opdlab.rollout.packed import packed_linears, use_packing
from opdlab.types import Problem, Rollouts


def top_p_filter(logits_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set of tokens whose probability reaches top_p to -inf."""
    if top_p is None or top_p >= 1.0:
        return logits_B_V
    sorted_B_V, order_B_V = logits_B_V.sort(dim=-1, descending=True)
    cum_B_V = sorted_B_V.softmax(-1).cumsum(-1)
    drop_sorted = cum_B_V - sorted_B_V.softmax(-1) >= top_p  # mass before this token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order_B_V, drop_sorted)
    return logits_B_V.masked_fill(drop, float("-inf"))


def draw(probs_B_V: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None,
         rows_B: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: u ~ U[0, 1) per row, the token is the first whose cumulative
    probability exceeds u x the row's total. A token of probability 0 is never drawn.

    It costs one random number per row, where `torch.multinomial` (and so HF `generate`) draws an exponential
    variate per vocabulary entry: at a 49k vocabulary that is most of a small model's decoding step on a CPU.
    With a list of generators, row i draws its u from generator i alone, so its token does not depend on which
    other rows share the batch (how a multi-process run matches a single-process one). The cumulative sum is
    taken in float64 so that rounding over a 150k vocabulary moves no visible mass between tokens.

    `rows_B` (with `total`): these probabilities are rows `rows_B` of a batch of `total` rows, the others finished.
    Each row draws the number it would draw in the whole batch (one generator draws `total` numbers), so dropping
    finished rows from decoding changes no row's token."""
    B = probs_B_V.shape[0]
    total = B if rows_B is None else total
    if isinstance(generator, list):
        if len(generator) != total:
            raise ValueError(f"sample(): {len(generator)} generators for {total} rows; pass one per row")
        own = generator if rows_B is None else [generator[i] for i in rows_B.tolist()]
        u_B = torch.cat([torch.rand(1, generator=g, device=probs_B_V.device, dtype=torch.float64) for g in own])
    else:
        u_B = torch.rand(total, generator=generator, device=probs_B_V.device, dtype=torch.float64)
        u_B = u_B if rows_B is None else u_B[rows_B]
    cdf_B_V = probs_B_V.to(torch.float64).cumsum(-1)
    tok_B = torch.searchsorted(cdf_B_V, (u_B * cdf_B_V[:, -1])[:, None], right=True).squeeze(-1)
    return tok_B.clamp_(max=probs_B_V.shape[-1] - 1)


class _StaticCache(StaticCache):
    """transformers' `StaticCache` storing keys and values in autocast's dtype when autocast is on: under bf16
    autocast the rotary embedding returns fp32 keys beside bf16 values, which one preallocated buffer cannot hold,
    and attention casts both to bf16 anyway, so storing them in bf16 changes no result."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        device_type = key_states.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def sample(model, tokenizer, problems: list[Problem], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None,
           vocab_size: int | None = None, prompts: list[str] | None = None,
           kv_cache: str = "static", packed: str = "auto", decoder: str = "auto") -> Rollouts:
    """One completion per problem (repeat problems for several samples). Greedy when temperature == 0.

    `kv_cache="static"` decodes into a cache allocated once for prompt + `max_new_tokens` positions
    (transformers' `StaticCache`; an architecture transformers does not run with one keeps its default cache);
    "dynamic" grows the model's default cache by one position a step, a concatenation per layer per token. Both
    give the same tokens and log-probs (tests/test_samplers.py); the static one decoded the SmolLM2 student ~1.5x
    faster on a CPU (docs/benchmarks.md).

    `packed="auto"`: under bf16 autocast on a CPU, decoding steps run every Linear on a bf16 copy of its weight
    reordered once for oneDNN (`opdlab.rollout.packed`); "off" leaves the products to autocast.

    `decoder="auto"` runs the prefill and the decoding steps of a Llama-family model (Llama, Mistral, Qwen2, Qwen3,
    LoRA or not) with opdlab's lean step (`opdlab.rollout.lean`: fused products, weights cast and packed once, fewer
    operators; the same computation, so in fp32 the same tokens), and any other model with transformers' forward;
    "hf" always uses transformers' forward (and then `kv_cache` and `packed` apply).

    `generator` may be a list with one generator per problem: each row then draws only from its own, so its tokens
    do not depend on which other rows share the batch (how a multi-process run matches a single-process one)."""
    device = next(model.parameters()).device
    prompts = prompts or [render_prompt(tokenizer, p.question) for p in problems]
    prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    V = vocab_size or model.get_output_embeddings().weight.shape[0]
    B = prompt_ids.shape[0]

    was_training = model.training
    model.eval()
    P = prompt_ids.shape[1]
    # the attention mask over prompt + completion, written one column a step (a row stops attending once done)
    mask_B_L = torch.zeros((B, P + max_new_tokens), dtype=prompt_mask.dtype, device=device)
    mask_B_L[:, :P] = prompt_mask
    if kv_cache not in ("static", "dynamic"):
        raise ValueError(f"sample(): kv_cache must be 'static' or 'dynamic', got {kv_cache!r}")
    if decoder not in ("auto", "hf"):
        raise ValueError(f"sample(): decoder must be 'auto' or 'hf', got {decoder!r}")
    pack = use_packing(packed, device)  # validates `packed` whichever decoder runs
    lean = LeanDecoder.build(model, B, P + max_new_tokens) if decoder == "auto" else None
    if lean is not None:
        next_logits = lean.prefill(prompt_ids, prompt_mask, position_ids(prompt_mask))
        step_context = nullcontext()
    else:
        cache = None  # the model's default (dynamic) cache
        if kv_cache == "static" and getattr(model, "_can_compile_fullgraph", False):  # the architectures
            cache = _StaticCache(config=model.config, max_cache_len=P + max_new_tokens)  # transformers runs so
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, next_logits = out.past_key_values, out.logits[:, -1]
        step_context = packed_linears(model, B, enabled=pack)  # decoding steps only
    next_pos_B_1 = position_ids(prompt_mask)[:, -1:] + 1
    alive_B = torch.ones(B, dtype=torch.bool, device=device)
    # The rows still decoded (R of the B): the lean decoder drops finished rows from its batch once a quarter of
    # it has finished; transformers' forward keeps decoding every row.
    rows_R = torch.arange(B, device=device)
    tokens, logp_old, logp_sampler, alive_steps = [], [], [], []
    with step_context:
        for t in range(max_new_tokens):
            logits_R_V = next_logits[:, :V].float()
            logp_R_V = F.log_softmax(logits_R_V, dim=-1)
            if temperature == 0:
                tok_R = logits_R_V.argmax(-1)
                sampler_logp_R_V = logp_R_V
            else:  # at temperature 1 without truncation the sampled distribution is the policy itself
                plain = temperature == 1 and (top_p is None or top_p >= 1)
                sampler_logp_R_V = logp_R_V if plain else F.log_softmax(
                    top_p_filter(logits_R_V / temperature, top_p), dim=-1)
                tok_R = draw(sampler_logp_R_V.exp(), generator, rows_R, B)
            tok_R = torch.where(alive_B[rows_R], tok_R, torch.full_like(tok_R, pad))
            tok_B = torch.full((B,), pad, dtype=tok_R.dtype, device=device).index_copy_(0, rows_R, tok_R)
            tokens.append(tok_B)
            logp_old.append(torch.zeros(B, device=device).index_copy_(
                0, rows_R, logp_R_V.gather(-1, tok_R[:, None]).squeeze(-1)))
            logp_sampler.append(torch.zeros(B, device=device).index_copy_(
                0, rows_R, sampler_logp_R_V.gather(-1, tok_R[:, None]).squeeze(-1)))
            alive_steps.append(alive_B)
            alive_B = alive_B & ~torch.isin(tok_B, stops)
            live = int(alive_B.sum())  # the step's one host sync (every row outside rows_R has finished)
            if live == 0:
                break
            mask_B_L[:, P + t] = alive_B
            if lean is not None:
                if 4 * (len(rows_R) - live) >= len(rows_R):  # a quarter of the decoded rows finished: drop them
                    keep_N = alive_B[rows_R].nonzero().squeeze(-1)
                    lean.keep_rows(keep_N)
                    rows_R, tok_R = rows_R[keep_N], tok_R[keep_N]
                next_logits = lean.decode(tok_R, next_pos_B_1[rows_R], mask_B_L[rows_R, :P + t + 1])
            else:
                out = model(input_ids=tok_B[:, None], attention_mask=mask_B_L[:, :P + t + 1],
                            position_ids=next_pos_B_1, past_key_values=cache, use_cache=True)
                cache, next_logits = out.past_key_values, out.logits[:, -1]
            next_pos_B_1 = next_pos_B_1 + 1
    model.train(was_training)

    completion_mask = torch.stack(alive_steps, dim=1).long()
    completion_ids = torch.stack(tokens, dim=1)
    zero = torch.zeros((), device=device)
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
    return Rollouts(
        prompt_ids_B_P=prompt_ids, prompt_mask_B_P=prompt_mask, completion_ids_B_T=completion_ids,
        completion_mask_B_T=completion_mask,
        logp_old_B_T=torch.where(completion_mask.bool(), torch.stack(logp_old, dim=1), zero),
        sampler_logp_B_T=torch.where(completion_mask.bool(), torch.stack(logp_sampler, dim=1), zero),
        problems=list(problems), texts=texts)


@torch.no_grad()
def reference_rollouts(model, tokenizer, problems: list[Problem], responses: list[str], *, max_new_tokens: int,
                       vocab_size: int | None = None, chunk_size: int = 1024,
                       prompts: list[str] | None = None) -> Rollouts:
    """Given responses as a `Rollouts`: each is tokenised, followed by EOS and cut to `max_new_tokens` (a cut one
    loses its EOS, like a rollout that ran out of tokens). log pi_old and the sampler log-probs are the model's
    log-probs of those tokens at temperature 1, computed without gradients (the batch is off-policy)."""
    device = next(model.parameters()).device
    prompts = prompts or [render_prompt(tokenizer, p.question) for p in problems]
    prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(tokenizer, prompts))
    rows = [(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_new_tokens]
            for text in responses]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completion_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        completion_ids[i, :len(r)], completion_mask[i, :len(r)] = torch.tensor(r), 1
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    V = vocab_size or model.get_output_embeddings().weight.shape[0]
    rollouts = Rollouts(
        prompt_ids_B_P=prompt_ids, prompt_mask_B_P=prompt_mask, completion_ids_B_T=completion_ids,
        completion_mask_B_T=completion_mask, logp_old_B_T=torch.zeros(completion_ids.shape, device=device),
        sampler_logp_B_T=torch.zeros(completion_ids.shape, device=device), problems=list(problems),
        texts=[tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
               for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())])
    was_training = model.training
    model.eval()
    logp_B_T = student_forward(model, rollouts, V, chunk_size).logp_B_T
    model.train(was_training)
    rollouts.logp_old_B_T, rollouts.sampler_logp_B_T = logp_B_T, logp_B_T.clone()
    return rollouts
