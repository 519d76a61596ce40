"""The config of `opdlab diagnose alignment` (`opdlab diagnose alignment --help` lists every field)."""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from opdlab.config import ModelConfig, ObjectiveConfig, PrivilegedConfig, TaskConfig, _Section
from opdlab.diagnostics.alignment.spec import parse_spec
from opdlab.objectives import OBJECTIVES


class AlignmentConfig(_Section):
    """A gradient alignment diagnostic run (`opdlab diagnose alignment`)."""

    student: ModelConfig = Field(default_factory=ModelConfig, description="The student whose rollouts are probed.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The external teacher ('teacher' in `teachers`).")
    task: TaskConfig = Field(default_factory=lambda: TaskConfig(arithmetic=dict(min_steps=2, max_steps=3,
                                                                                max_value=19)), description=(
        "The task: questions, oracle traces and the verifier (default: the built-in arithmetic task as the demo "
        "sets it, 2-3 steps, values up to 19)."))
    split: str = Field("test", description="Split the questions come from ('train' or 'test').")
    num_questions: int = Field(16, ge=1, description="Questions probed: the first N of the split.")
    samples_per_question: int = Field(2, ge=1, description="Student rollouts per question.")
    max_new_tokens: int = Field(96, ge=1, description="Token budget of a response, rollouts and targeted ones alike.")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature (rollouts and continuations).")
    top_p: float = Field(1.0, gt=0, le=1, description="Student nucleus sampling (1 = off).")
    teachers: list[str] = Field(["teacher", "self+full"], description=(
        "Teachers / contexts compared, each 'MODEL' or 'MODEL+VIEW': MODEL in {teacher, self}, VIEW in "
        "{none, full, partial, summary} (see `opdlab.diagnostics.alignment.spec`)."))
    signals: list[str] = Field(["opd", "reverse_kl", "forward_kl", "jsd", "lsm"], description=(
        "Distillation signals: objective-table names (`opdlab objectives`); their settings come from `objective`."))
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description=(
        "Settings shared by every signal (support_k, divergence.beta, lsm.support, ...); `objective.name` is ignored."))
    privileged: PrivilegedConfig = Field(default_factory=PrivilegedConfig, description=(
        "Oracle-trace contexts: the template and rho of the 'full', 'partial' and 'summary' views."))
    student_top_k: int = Field(3, ge=0, description="The student's top-k tokens join the candidate set.")
    teacher_top_k: int = Field(3, ge=0, description="Each teacher's / context's top-k tokens join the candidate set.")
    rollouts_per_candidate: int = Field(8, ge=1, description="n: targeted rollouts per candidate token.")
    budget: int = Field(20000, ge=1, description=(
        "Targeted rollouts in all; nodes are taken depth level by depth level until the next would exceed it."))
    depth_ratio: float = Field(2.0, gt=1, description=(
        "Node depths floor(ratio^k) - 1 along each rollout: 2 -> 0, 1, 3, 7, 15, ...; smaller = denser."))
    max_nodes_per_rollout: int | None = Field(None, ge=1, description="At most this many depth levels per rollout.")
    param_subset: str | None = Field(None, description=(
        "Regex over the student's parameter names: also report alignment in that parameter space (None = off)."))
    batch_size: int = Field(1024, ge=1, description="Rows generated at once (rollouts and targeted rollouts).")
    chunk_size: int = Field(1024, ge=1, description="Positions per chunk in teacher scoring and the objectives.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of the confidence intervals.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    example_rollouts: int = Field(3, ge=0, description="Rollouts drawn in the along-positions plot.")
    seed: int = Field(0, description="Seed of rollouts, targeted rollouts and bootstrap.")
    run_dir: str = Field("runs/alignment", description="Where alignment.json and the plots are written.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")

    @field_validator("teachers")
    @classmethod
    def _specs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one teacher / context")
        for s in v:
            parse_spec(s)
        if len(set(v)) != len(v):
            raise ValueError(f"teachers has repeats: {v}")
        return v

    @field_validator("signals")
    @classmethod
    def _signals(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one signal")
        unknown = [s for s in v if s not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown signal(s) {unknown}; allowed: {', '.join(sorted(OBJECTIVES))}")
        if len(set(v)) != len(v):
            raise ValueError(f"signals has repeats: {v}")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {v!r}")
        return v

    @field_validator("param_subset")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v
