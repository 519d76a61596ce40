"""The teacher's context: the student's prompt, or a view of the oracle trace
(docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd).

In privileged on-policy distillation the teacher scores the student's rollout under a prompt that also holds the
task's oracle trace (`Problem.solution`), which the student never sees. This module builds those prompts and
scores one or two teacher contexts in one forward pass (`score_views`; with the single view 'none' that is plain
`opdlab.teacher.scoring.score`).

Views (`privileged.view`, and the two views the privileged objectives ask for):

    none      the student's own prompt
    full      the template filled with the whole oracle trace
    partial   the template filled with the first `rho` of the trace's reasoning (by characters, extended to the
              end of the word it cuts) followed by the trace's final-answer line

The reasoning of a trace is every line before its last 'Answer: ...' line (every task with worked solutions ends
its trace in one: the built-in task, files through `with_answer_line`, reasoning-gym's gsm_symbolic); a trace
without one is all reasoning and its partial view keeps the first rho only. The template
(`privileged.template`, with {question} and {trace}) says that the trace is an example and asks for a response of
the model's own; it becomes the user message and goes through the model's chat template like any prompt.

Teachers (`privileged.teacher`): the model at `teacher.path` (default), or a self-teacher made by
`opdlab.teacher.self_teacher`.

    from opdlab.teacher.views import teacher_prompts, score_views
    full = teacher_prompts(tokenizer, problems, "full", cfg.privileged)       # list of rendered prompt strings
    scores = score_views(teacher, tokenizer, rollouts, ["full", "partial"], cfg.privileged, vocab_size)
    scores.partial                                                             # the partial view's TeacherScores
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from opdlab.config import PrivilegedConfig
from opdlab.models.prompts import encode_prompts, render_prompt
from opdlab.teacher.scoring import score
from opdlab.types import Problem, Rollouts, TeacherScores

VIEWS = ("none", "full", "partial")
_ANSWER_LINE = re.compile(r"^\s*Answer:", re.IGNORECASE)


def split_trace(trace: str) -> tuple[str, str]:
    """(reasoning, final-answer line) of an oracle trace; the answer line is '' when the trace has none."""
    lines = trace.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _ANSWER_LINE.match(lines[i]):
            return "\n".join(lines[:i]), "\n".join(lines[i:])
    return trace.rstrip(), ""


def cut_at_word(text: str, rho: float) -> str:
    """The first `rho` of `text` by characters, extended to the end of the word the cut falls in."""
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    n = round(rho * len(text))
    if n <= 0:
        return ""
    while n < len(text) and not text[n].isspace() and not text[n - 1].isspace():
        n += 1
    return text[:n].rstrip()


def partial_trace(trace: str, rho: float) -> str:
    """The partial view's trace: the first `rho` of the reasoning (word boundary) plus the final-answer line."""
    reasoning, answer = split_trace(trace)
    head = cut_at_word(reasoning, rho)
    return "\n".join(part for part in (head, answer) if part)


def view_text(problem: Problem, view: str, cfg: PrivilegedConfig) -> str:
    """The teacher's user message for `problem` under `view`."""
    if view == "none":
        return problem.question
    if view not in VIEWS:
        raise ValueError(f"unknown teacher view {view!r}; allowed: {', '.join(VIEWS)}")
    if not problem.solution:
        raise ValueError(f"the {view} teacher view needs an oracle trace, but problem {problem.uid!r} has no worked "
                         f"solution (Problem.solution); use a task that provides them (the built-in task, a file "
                         f"with a solution field, reasoning-gym's gsm_symbolic) or privileged.view=none")
    trace = problem.solution if view == "full" else partial_trace(problem.solution, cfg.rho)
    return cfg.template.format(question=problem.question, trace=trace)


def teacher_prompts(tokenizer, problems: list[Problem], view: str, cfg: PrivilegedConfig) -> list[str]:
    """Rendered teacher prompts (the tokenizer's chat template where it has one), one per problem."""
    return [render_prompt(tokenizer, view_text(p, view, cfg)) for p in problems]


def _left_pad(ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, P: int, pad: int):
    extra = P - ids_B_P.shape[1]
    if extra == 0:
        return ids_B_P, mask_B_P
    return (torch.cat([ids_B_P.new_full((ids_B_P.shape[0], extra), pad), ids_B_P], dim=1),
            torch.cat([mask_B_P.new_zeros(mask_B_P.shape[0], extra), mask_B_P], dim=1))


def view_prompt_ids(tokenizer, rollouts: Rollouts, view: str, cfg: PrivilegedConfig, own_prompt: bool = False):
    """(ids_B_P, mask_B_P) of the teacher's prompts under `view`, on the rollouts' device. View 'none' is the
    student's prompt tokens, or with `own_prompt` (a teacher with a prompt format of its own) the question rendered
    by `tokenizer`, the teacher's."""
    if view == "none" and not own_prompt:
        return rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P
    ids, mask = encode_prompts(tokenizer, teacher_prompts(tokenizer, rollouts.problems, view, cfg))
    device = rollouts.prompt_ids_B_P.device
    return ids.to(device), mask.to(device)


def score_views(teacher, tokenizer, rollouts: Rollouts, views: list[str] | tuple[str, ...], cfg: PrivilegedConfig,
                vocab_size: int, *, top_k: int = 0, chunk_size: int = 1024, keep_hidden: bool = False,
                own_prompt: bool = False, **score_kwargs) -> TeacherScores:
    """Teacher scores of the rollouts under one or two views, in a single teacher forward.

    With two views the two prompt batches are left-padded to one length and stacked (2B rows, each completion
    twice), scored by one `opdlab.teacher.scoring.score` call and split again: the result holds the first view's scores
    and, in `.partial`, the second's. `tokenizer` renders the teacher's prompts (the teacher's, with its prompt
    format); `own_prompt` renders view 'none' too instead of reusing the student's prompt tokens. Other keyword
    arguments (the lookahead request) go to `score` unchanged."""
    if not 1 <= len(views) <= 2:
        raise ValueError(f"score_views takes one or two views, got {list(views)}")
    prompts = [view_prompt_ids(tokenizer, rollouts, v, cfg, own_prompt) for v in views]
    kwargs = dict(top_k=top_k, chunk_size=chunk_size, keep_hidden=keep_hidden, **score_kwargs)
    if len(views) == 1:
        (ids, mask), = prompts
        return score(teacher, rollouts, vocab_size, teacher_prompt_ids_B_P=ids, teacher_prompt_mask_B_P=mask,
                     **kwargs)
    P = max(ids.shape[1] for ids, _ in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padded = [_left_pad(ids, mask, P, pad) for ids, mask in prompts]
    ids_2B_P = torch.cat([ids for ids, _ in padded])
    mask_2B_P = torch.cat([mask for _, mask in padded])
    B = len(rollouts.problems)
    doubled = replace(rollouts, prompt_ids_B_P=ids_2B_P, prompt_mask_B_P=mask_2B_P,
                      completion_ids_B_T=rollouts.completion_ids_B_T.repeat(2, 1),
                      completion_mask_B_T=rollouts.completion_mask_B_T.repeat(2, 1),
                      logp_old_B_T=rollouts.logp_old_B_T.repeat(2, 1),
                      sampler_logp_B_T=rollouts.sampler_logp_B_T.repeat(2, 1),
                      loss_mask_B_T=rollouts.loss_mask_B_T.repeat(2, 1),
                      problems=rollouts.problems * 2, texts=rollouts.texts * 2)
    both = score(teacher, doubled, vocab_size, **kwargs)
    first, second = both.select(slice(0, B)), both.select(slice(B, 2 * B))
    first.partial = second
    return first
