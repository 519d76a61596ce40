"""Rollout backends behind one interface: `sampler.sample(problems, seeds) -> Rollouts` and
`sampler.push_weights(model)` after every optimizer step.

`rollout.backend: builtin` samples with the trained model itself (`opdlab.rollout.builtin.sample`, a KV-cache decode
loop), so there is nothing to push; `rollout.backend: vllm` samples with a vLLM engine (`opdlab.rollout.vllm`), which is
sent the student's weights after each step. Both draw row i from its own seed `seeds[i]` (derived from the run
seed, the step and the row's global index: `opdlab.distributed.row_seeds`), and both return the sampler's
log-probs of the sampled tokens in `Rollouts.logp_old_B_T`.
"""
from __future__ import annotations

from typing import Protocol

import torch

from opdlab.config import RolloutConfig
from opdlab.distributed import row_generators
from opdlab.rollout.builtin import sample
from opdlab.types import Problem, Rollouts


class Sampler(Protocol):
    def sample(self, problems: list[Problem], seeds: list[int]) -> Rollouts: ...

    def push_weights(self, model: torch.nn.Module) -> None: ...


class BuiltinSampler:
    """Samples with the trained model (no copy of the weights, so `push_weights` has nothing to do)."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, vocab_size: int):
        self.model, self.tokenizer, self.cfg, self.vocab_size = model, tokenizer, cfg, vocab_size

    def sample(self, problems: list[Problem], seeds: list[int]) -> Rollouts:
        device = next(self.model.parameters()).device
        return sample(self.model, self.tokenizer, problems, max_new_tokens=self.cfg.max_new_tokens,
                      temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                      generator=row_generators(seeds, device), vocab_size=self.vocab_size,
                      kv_cache=self.cfg.kv_cache, packed=self.cfg.packed_linears,
                      decoder=self.cfg.decoder)

    def push_weights(self, model: torch.nn.Module) -> None:
        pass


def make_sampler(cfg: RolloutConfig, model, tokenizer, vocab_size: int, model_path: str) -> Sampler:
    """The backend `cfg.backend` names; `model_path` is where vLLM loads the initial student from."""
    if cfg.backend == "vllm":
        from opdlab.rollout.vllm import VLLMSampler  # lazy: it imports vllm, an optional dependency
        return VLLMSampler(cfg, model, tokenizer, vocab_size, model_path)
    return BuiltinSampler(model, tokenizer, cfg, vocab_size)
