"""The objects passed between pipeline stages.

Shape suffixes on tensor names: B = batch, P = prompt length, T = completion length, K = top-K, H = hidden size,
V = vocabulary. Every tensor here is on the device of the model that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Problem:
    """One task instance.

    `question` is what the student sees; `answer` is the reference final answer the verifier checks against;
    `solution` is an optional worked solution (the oracle trace privileged methods show the teacher, and the SFT
    target of the warm-start step); `meta` carries task-specific fields (difficulty, source file and row, ...).
    """

    uid: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollouts:
    """A batch of student samples: left-padded prompts followed by right-padded completions.

    `completion_mask_B_T` is 1 on generated tokens up to and including EOS. `loss_mask_B_T` is the subset of those
    that objectives learn from and normalise by (special-token masking, `opdlab.rollout.masking`); it defaults to the
    completion mask. `logp_old_B_T` is the sampling policy's log-probability of each sampled token at temperature 1
    without truncation (log pi_old in docs/methods.md#notation); `sampler_logp_B_T` is the log-probability under the
    distribution actually sampled from (after temperature and top-p), kept for diagnostics. `reward_advantage_B` is
    each rollout's task reward normalised within its prompt's group of samples (GRPO's advantage,
    `opdlab.objectives.common.group_normalised_rewards`); the training loop sets it when `objective.reward_weight`
    > 0, and the sampled-token objectives add `reward_weight` times it to every token's advantage.
    """

    prompt_ids_B_P: torch.Tensor
    prompt_mask_B_P: torch.Tensor
    completion_ids_B_T: torch.Tensor
    completion_mask_B_T: torch.Tensor
    logp_old_B_T: torch.Tensor
    sampler_logp_B_T: torch.Tensor
    problems: list[Problem]
    texts: list[str]
    loss_mask_B_T: torch.Tensor | None = None
    reward_advantage_B: torch.Tensor | None = None

    def __post_init__(self):
        if self.loss_mask_B_T is None:
            self.loss_mask_B_T = self.completion_mask_B_T

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_B_T.sum().item())

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask_B_T.sum().item())

    def input_ids(self) -> torch.Tensor:
        """(B, P+T) prompt followed by completion."""
        return torch.cat([self.prompt_ids_B_P, self.completion_ids_B_T], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_B_P, self.completion_mask_B_T], dim=1)

    def select(self, index: slice | list[int]) -> "Rollouts":
        """Rows of this batch, e.g. a micro-batch for gradient accumulation."""
        return _select(self, index)


@dataclass
class TeacherScores:
    """What the teacher says about each completion token, aligned with `Rollouts.completion_ids_B_T`.

    Position t holds the teacher's next-token distribution at context (teacher prompt, y_<t): `logp_B_T` is
    log pi_T(y_t | c_t), `topk_ids_B_T_K`/`topk_logp_B_T_K` its top-K (K may be 0), `entropy_B_T` and
    `maxp_B_T` its entropy and max-probability (the fidelity F(t) of docs/methods.md#supervision-fidelity-decay).

    Objectives that need the teacher's whole distribution (full-vocabulary divergences) ask `score` to keep the
    teacher's last hidden states `hidden_B_T_H` and its output layer `lm_head` (with `vocab_size` and `softcap`,
    as in `opdlab.models.logprobs.chunk_logits`), and make logits from them chunk by chunk; otherwise these are None.

    `partial` is set when the objective asked for two teacher contexts (`TeacherRequest.both_views`, the privileged
    objectives): these scores are then the teacher's under the full view of the oracle trace, and `partial` holds
    its scores, same fields, under the partial view (`opdlab.teacher.views`); both come from one teacher forward.

    `pending_B_T` marks positions whose `logp_B_T`, `entropy_B_T` and `maxp_B_T` are not computed yet (zero for
    now): an objective that makes the teacher's logits there anyway (the full-vocabulary divergences, asking with
    `TeacherRequest.stats_from_objective`) returns them in `ObjectiveOutput.teacher_stats`, and the training step
    writes them in (`fill_pending`), so each of the teacher's logit chunks is made once. None: nothing pending.

    The `lookahead_*` fields are set when the objective asked for candidate rewards (`TeacherRequest.lookahead`,
    the lookahead objective, docs/methods.md#lookahead-group-reward-lgr): `lookahead_trigger_B_T` marks the loss
    positions where the student's entropy exceeds tau, `lookahead_ids_B_T_K` holds the student's top-K candidates there
    and `lookahead_reward_B_T_K` each candidate's raw reward, the teacher's confidence one step ahead, e.g.
    max_v pi_T(v | x, y_<t, v_k) (zero where there is no trigger); see `opdlab.teacher.tree_attention`.
    """

    logp_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor
    topk_logp_B_T_K: torch.Tensor
    entropy_B_T: torch.Tensor
    maxp_B_T: torch.Tensor
    hidden_B_T_H: torch.Tensor | None = None
    lm_head: torch.nn.Module | None = None
    vocab_size: int | None = None
    softcap: float | None = None
    partial: "TeacherScores | None" = None
    lookahead_trigger_B_T: torch.Tensor | None = None
    lookahead_ids_B_T_K: torch.Tensor | None = None
    lookahead_reward_B_T_K: torch.Tensor | None = None
    pending_B_T: torch.Tensor | None = None

    def select(self, index: slice | list[int]) -> "TeacherScores":
        return _select(self, index)

    def fill_pending(self, rows: slice, stats: dict[str, torch.Tensor]) -> None:
        """Write an objective's `teacher_stats` for rows `rows` (each an (N,) tensor over those rows' pending
        positions, in row-major order) into this batch's logp / entropy / maxp."""
        pending_B_T = self.pending_B_T[rows]
        for name, field_name in (("logp", "logp_B_T"), ("entropy", "entropy_B_T"), ("maxp", "maxp_B_T")):
            if name not in stats:
                raise ValueError(f"the objective returned no teacher {name!r} for the positions score() left to it")
            getattr(self, field_name)[rows][pending_B_T] = stats[name].to(getattr(self, field_name).dtype)


@dataclass
class StudentOutputs:
    """The student's forward pass on a rollout batch, with gradients.

    `logp_B_T` (differentiable) is log pi_theta(y_t | c_t) of the sampled tokens; `entropy_B_T` is detached.
    `hidden_B_T_H` (differentiable) and `lm_head` let full-vocabulary objectives compute logits in chunks
    themselves instead of holding (B, T, V) at once: `opdlab.models.logprobs.chunk_logits(hidden, lm_head, vocab_size,
    softcap)` over `chunk_size` positions at a time (vocab_size None = every output row).
    """

    logp_B_T: torch.Tensor
    entropy_B_T: torch.Tensor
    hidden_B_T_H: torch.Tensor
    lm_head: torch.nn.Module
    vocab_size: int | None = None
    softcap: float | None = None
    chunk_size: int = 1024


@dataclass(frozen=True)
class LookaheadRequest:
    """Candidate rewards for the lookahead objective. `score` runs the student once without gradients to find the
    trigger positions (loss positions where its entropy exceeds `tau`) and its top-`k` tokens there, then scores
    every candidate one step ahead with tree attention, `segment_len` completion positions per teacher pass; the
    reward is the teacher's confidence under `signal` ('max_p', 'sampled_p', 'neg_entropy' or 'perplexity', as in
    `opdlab.teacher.tree_attention.confidence_reward`)."""

    k: int = 8
    tau: float = 0.2
    signal: str = "max_p"
    segment_len: int = 256


@dataclass(frozen=True)
class TeacherRequest:
    """What an objective needs from `opdlab.teacher.scoring.score` beyond the sampled token's log-prob, entropy,
    max-prob."""

    top_k: int = 0  # the teacher's top-K ids and log-probs per position
    hidden: bool = False  # keep its hidden states and output layer: its full distribution, made chunk by chunk
    # the objective computes the teacher's sampled-token log-prob, entropy and max-prob at the loss positions from
    # the logits it makes there anyway (`ObjectiveOutput.teacher_stats`); `score` leaves them pending
    stats_from_objective: bool = False
    # score two contexts, the full and the partial view of the oracle trace (`TeacherScores.partial`), in one pass;
    # otherwise one context, `privileged.view` of the run's config (by default the student's own prompt)
    both_views: bool = False
    # the student's top-K candidates at its high-entropy positions, each scored by the teacher one step ahead
    # (`TeacherScores.lookahead_*`); needs the student model passed to `score`
    lookahead: LookaheadRequest | None = None


@dataclass
class ObjectiveOutput:
    """An objective's scalar loss (already normalised) and its per-step diagnostics (floats).

    `teacher_stats` ('logp', 'entropy', 'maxp': (N,) over the batch's loss positions, row-major) is what an
    objective asking for `TeacherRequest.stats_from_objective` returns of the teacher's distribution."""

    loss: torch.Tensor
    metrics: dict[str, float]
    teacher_stats: dict[str, torch.Tensor] | None = None


def _select(obj, index):
    if isinstance(index, slice):
        rows = list(range(*index.indices(len(obj.problems) if hasattr(obj, "problems") else _first_len(obj))))
    else:
        rows = list(index)
    idx = torch.as_tensor(rows, dtype=torch.long)
    values = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            values[f.name] = v.index_select(0, idx.to(v.device))
        elif isinstance(v, list):
            values[f.name] = [v[i] for i in rows]
        elif isinstance(v, TeacherScores):
            values[f.name] = _select(v, rows)
        else:
            values[f.name] = v
    return replace(obj, **values)


def _first_len(obj) -> int:
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("empty batch")
