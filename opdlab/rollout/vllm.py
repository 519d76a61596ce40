"""Rollouts with vLLM (`rollout.backend: vllm`): the same interface as the built-in sampler (`opdlab.rollout.samplers`),
returning the sampler's own log-probs of the sampled tokens, with the student's weights pushed into the engine
after every optimizer step.

    pip install vllm                      # Linux with a CUDA GPU; not needed for anything else in opdlab
    opdlab train CONFIG.yaml rollout.backend=vllm rollout.vllm_gpu_memory_utilization=0.3

The engine runs in the training process, on the same GPU as the student (under `accelerate launch`, one engine
per process, each sampling that process's share of the prompts). It is started from `student.path`; after each
step `push_weights` loads the trained weights into it (`load_weights` on the engine's model) and resets its prefix
cache, so the next step samples from the updated student. vLLM is asked for the raw log-probs of the sampled tokens
(`logprobs_mode='raw_logprobs'`: before temperature and top-p), which is log pi_old (docs/methods.md#notation); vLLM
returns one kind only, so `sampler_logp_B_T` holds the same values (it is kept for diagnostics). Row i is sampled with
the per-request seed `seeds[i]`, so rows do not depend on their batch; vLLM's kernels differ from the trainer's, so
the tokens differ from the built-in sampler's for the same seed.

vLLM cannot be installed on a machine without a CUDA GPU; importing this module works anywhere, creating a
`VLLMSampler` without vLLM raises an ImportError that says what to do. `pack_outputs` (vLLM's outputs -> Rollouts)
is plain Python and tested with the built-in backend's rollouts.
"""
from __future__ import annotations

import os

import torch

from opdlab.config import RolloutConfig
from opdlab.models.prompts import encode_prompts, render_prompt, stop_token_ids
from opdlab.types import Problem, Rollouts


def _import_vllm():
    try:
        import vllm  # lazy: optional (pip install vllm), GPU only
    except ImportError as e:
        raise ImportError(
            "rollout.backend=vllm needs vLLM, which is not installed here (it needs Linux and a CUDA GPU): "
            "`pip install vllm` on the GPU machine, or use rollout.backend=builtin") from e
    return vllm


def pack_outputs(prompt_ids_B_P: torch.Tensor, prompt_mask_B_P: torch.Tensor, completions: list[list[int]],
                 logps: list[list[float]], problems: list[Problem], tokenizer, pad_id: int) -> Rollouts:
    """Generated token ids and their log-probs per row (ragged) as a `Rollouts` batch, completions right-padded."""
    if not (len(completions) == len(logps) == len(problems) == prompt_ids_B_P.shape[0]):
        raise ValueError(f"pack_outputs: {len(completions)} completions, {len(logps)} log-prob rows, "
                         f"{len(problems)} problems and {prompt_ids_B_P.shape[0]} prompts")
    B, T = len(completions), max(1, max(len(c) for c in completions))
    ids_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros((B, T), dtype=torch.long)
    logp_B_T = torch.zeros((B, T), dtype=torch.float32)
    for i, (tokens, lps) in enumerate(zip(completions, logps)):
        if len(tokens) != len(lps):
            raise ValueError(f"pack_outputs: row {i} has {len(tokens)} tokens but {len(lps)} log-probs")
        n = len(tokens)
        ids_B_T[i, :n] = torch.tensor(tokens, dtype=torch.long)
        mask_B_T[i, :n] = 1
        logp_B_T[i, :n] = torch.tensor(lps, dtype=torch.float32)
    device = prompt_ids_B_P.device
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(ids_B_T, mask_B_T)]
    return Rollouts(prompt_ids_B_P=prompt_ids_B_P, prompt_mask_B_P=prompt_mask_B_P,
                    completion_ids_B_T=ids_B_T.to(device), completion_mask_B_T=mask_B_T.to(device),
                    logp_old_B_T=logp_B_T.to(device), sampler_logp_B_T=logp_B_T.clone().to(device),
                    problems=list(problems), texts=texts)


class VLLMSampler:
    """A vLLM engine holding a copy of the student, refreshed by `push_weights` after every optimizer step."""

    def __init__(self, cfg: RolloutConfig, model: torch.nn.Module, tokenizer, vocab_size: int, model_path: str):
        # the engine in this process, so that push_weights hands it tensors without serialising them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        self.vllm, self.cfg, self.tokenizer, self.vocab_size = vllm, cfg, tokenizer, vocab_size
        self.stops = stop_token_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.device = next(model.parameters()).device
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
            next(model.parameters()).dtype]
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, dtype=dtype,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            logprobs_mode="raw_logprobs", enable_prefix_caching=True)
        self.push_weights(model)  # the trainer's weights, not the checkpoint's (e.g. a resumed run)

    def sample(self, problems: list[Problem], seeds: list[int]) -> Rollouts:
        if len(seeds) != len(problems):
            raise ValueError(f"VLLMSampler.sample: {len(seeds)} seeds for {len(problems)} problems")
        prompts = [render_prompt(self.tokenizer, p.question) for p in problems]
        prompt_ids_B_P, prompt_mask_B_P = encode_prompts(self.tokenizer, prompts)
        requests = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids_B_P, prompt_mask_B_P)]
        params = [self.vllm.SamplingParams(
            n=1, temperature=self.cfg.temperature, top_p=self.cfg.top_p if self.cfg.top_p is not None else 1.0,
            max_tokens=self.cfg.max_new_tokens, seed=seed, logprobs=0, stop_token_ids=self.stops,
            ignore_eos=False, skip_special_tokens=True) for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions, logps = [], []
        for out in outputs:
            gen = out.outputs[0]
            tokens = list(gen.token_ids)
            completions.append(tokens)
            logps.append([step[tok].logprob for tok, step in zip(tokens, gen.logprobs)])
        return pack_outputs(prompt_ids_B_P.to(self.device), prompt_mask_B_P.to(self.device), completions, logps,
                            problems, self.tokenizer, self.pad)

    @torch.no_grad()
    def push_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights into the engine and drop KV blocks cached under the old ones."""
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        else:  # older releases: the model behind the in-process executor
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()
