"""Teacher continuation accuracy (step 2 of `opdlab.diagnostics.fidelity.measure`): the teacher completes student
prefixes cut after t tokens, and the task's verifier scores prefix + continuation.

    from opdlab.diagnostics.fidelity.continuation import choose_cuts, continuation_accuracy
    results = continuation_accuracy(teacher, tokenizer, task, problems, prompts, completions, rewards,
                                    choose_cuts(lengths, cfg), cfg, generator=torch.Generator(),
                                    rng=np.random.default_rng(0))

A cut at t keeps the student's first t completion tokens (t = 0: the teacher alone); only rollouts longer than t
are cut there, so a prefix never holds the stop token. Each cut gets an equal share of the `max_continuations`
budget (at least one prefix; prefixes drawn at random when more are eligible), and every prefix gets
`continuations` samples. The teacher continues from the exact token ids (prompt + prefix) through
`opdlab.rollout.builtin.sample`: decoding a prefix and encoding the text again would give other tokens whenever the
student sampled a non-canonical split, which byte-level BPE tokenizers allow.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.config import FidelityConfig
from opdlab.diagnostics.fidelity.result import CutResult
from opdlab.rollout.builtin import sample
from opdlab.tasks.base import Task
from opdlab.types import Problem


def choose_cuts(lengths: list[int], cfg: FidelityConfig) -> list[int]:
    """The configured cut positions, or `num_cuts` evenly spaced from 0 to the 90th-percentile length minus one."""
    if cfg.cut_positions is not None:
        return list(cfg.cut_positions)
    top = max(0, int(np.percentile(lengths, 90)) - 1) if lengths else 0
    return sorted({int(round(x)) for x in np.linspace(0, top, cfg.num_cuts)})


def _encode(tokenizer, text: str) -> list[int]:
    # as opdlab.models.prompts.encode_prompts: a rendered chat template already holds its special tokens
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


class _ExactTokens:
    """The tokenizer, except that encoding the given prompt texts yields the given token ids (left-padded).

    `opdlab.rollout.builtin.sample` encodes the prompts it is handed with one `tokenizer(prompts, ...)` call; passing
    this in place of the tokenizer makes it start from exact token ids (prompt + student prefix) while everything else
    (decoding, special-token ids, the chat template) is the tokenizer's own."""

    def __init__(self, tokenizer, texts: list[str], ids: list[list[int]]):
        self._tokenizer, self._texts, self._ids = tokenizer, texts, ids

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, texts, **kwargs):
        if list(texts) != self._texts:
            raise RuntimeError("fidelity: opdlab.rollout.builtin.sample encoded texts other than the continuation "
                               "prompts")
        length = max(len(r) for r in self._ids)
        ids_B_P = torch.full((len(self._ids), length), self._tokenizer.pad_token_id, dtype=torch.long)
        mask_B_P = torch.zeros((len(self._ids), length), dtype=torch.long)
        for i, row in enumerate(self._ids):
            ids_B_P[i, length - len(row):], mask_B_P[i, length - len(row):] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids_B_P, "attention_mask": mask_B_P}


def batch_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def continuation_accuracy(teacher, tokenizer, task: Task, problems: list[Problem], prompts: list[str],
                          completions: list[list[int]], rewards: list[float], cuts: list[int], cfg: FidelityConfig,
                          *, generator: torch.Generator, rng: np.random.Generator, vocab_size: int | None = None,
                          progress: bool = True) -> list[CutResult]:
    """Teacher accuracy from student prefixes (`completions`: the student's token ids per rollout, stop token
    included) cut at each of `cuts`: `cfg.continuations` samples per prefix, verified on prefix + continuation."""
    k = cfg.continuations
    if k < 1 or not cuts or min(cuts) < 0:
        raise ValueError(f"continuation_accuracy needs continuations >= 1 and cut positions >= 0, got "
                         f"continuations={k}, cuts={cuts}")
    share = max(1, cfg.max_continuations // (k * len(cuts)))
    jobs = []  # (cut index, rollout row, prompt + prefix token ids, prefix text for the verifier)
    prompt_ids = {}
    for ci, t in enumerate(cuts):
        rows = [i for i, ids in enumerate(completions) if len(ids) > t]  # the prefix ends before the stop token
        if len(rows) > share:
            rows = sorted(rng.choice(rows, size=share, replace=False).tolist())
        for i in rows:
            prefix = completions[i][:t]
            if i not in prompt_ids:  # the ids the student's rollout started from
                prompt_ids[i] = _encode(tokenizer, prompts[i])
            jobs.append((ci, i, prompt_ids[i] + prefix, tokenizer.decode(prefix, skip_special_tokens=True)))
    flat = [j for j in range(len(jobs)) for _ in range(k)]
    reward_sum = [0.0] * len(jobs)
    with tqdm(total=len(flat), desc="teacher continuations", disable=not progress, leave=False) as bar:
        for mb in batch_slices(len(flat), cfg.batch_size):
            chunk = flat[mb]
            texts = [f"continuation {n}" for n in range(len(chunk))]  # placeholders: _ExactTokens encodes them
            out = sample(teacher, _ExactTokens(tokenizer, texts, [jobs[j][2] for j in chunk]),
                         [problems[jobs[j][1]] for j in chunk], prompts=texts, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, generator=generator, vocab_size=vocab_size)
            for j, text in zip(chunk, out.texts, strict=True):
                reward_sum[j] += float(task.verify(problems[jobs[j][1]], jobs[j][3] + text))
            bar.update(len(chunk))
    results = []
    for ci, t in enumerate(cuts):
        mine = [j for j, job in enumerate(jobs) if job[0] == ci]
        n = len(mine) * k
        acc = sum(reward_sum[j] for j in mine) / n if n else None
        results.append(CutResult(
            position=t, prefixes=len(mine), continuations=n, accuracy=acc,
            stderr=math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else None,
            student_accuracy=float(np.mean([rewards[jobs[j][1]] for j in mine])) if mine else None))
    return results
