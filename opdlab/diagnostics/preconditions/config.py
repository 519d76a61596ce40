"""The config of `opdlab diagnose` (the preconditions; `opdlab diagnose --help` lists every field)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from opdlab.config import ModelConfig, PrivilegedConfig, TaskConfig, _Section

CHECKS = ("sfd", "lgr", "privileged", "alignment")

# Sizes per built-in pair, for the fields a user did not set: the SmolLM2 pair's models are real LMs (135M / ~70M)
# whose rollouts run to ~300 subword tokens, so it gets fewer questions, nodes and continuations.
PAIR_PRESETS = {
    "builtin": dict(student=ModelConfig(path="builtin:student"), teacher=ModelConfig(path="builtin:teacher"),
                    task=TaskConfig(name="arithmetic", seed=0, arithmetic=dict(min_steps=2, max_steps=3,
                                                                               max_value=19)),
                    max_new_tokens=96),
    "smollm2": dict(student=ModelConfig(path="builtin:smollm2-student"),
                    teacher=ModelConfig(path="builtin:smollm2-teacher"),
                    task=TaskConfig(name="arithmetic", seed=0, arithmetic=dict(style="words", min_steps=3,
                                                                               max_steps=8, max_value=50)),
                    max_new_tokens=320, num_questions=8, samples_per_question=2, lgr_nodes=12, lgr_k=4,
                    lgr_rollouts_per_candidate=4, alignment_rollouts_per_node=4, alignment_max_nodes_per_rollout=4,
                    sfd_continuations=2, sfd_num_cuts=3, batch_size=16),
}


class PreconditionsConfig(_Section):
    """`opdlab diagnose`: whether each phenomenon the methods address is present for a pair and task, training-free."""

    pair: Literal["builtin", "smollm2"] | None = Field(None, description=(
        "A built-in pair (`opdlab prepare --pair NAME`): sets student, teacher, task and max_new_tokens, and sizes "
        "the measurement for the pair, for every field not given explicitly. None: the fields as given."))
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:student"),
                                 description="The student.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The teacher (also the privileged teacher, under the trace views).")
    privileged_teacher: ModelConfig | None = Field(None, description=(
        "The teacher of the privileged check, under the trace views (None: `teacher`). The built-in teacher never "
        "saw a trace in its prompt; `opdlab compare-privileged` makes one that has."))
    task: TaskConfig = Field(default_factory=lambda: TaskConfig(arithmetic=dict(min_steps=2, max_steps=3,
                                                                                max_value=19)), description=(
        "Problems, oracle traces and verifier (default: the built-in task, 2-3 steps, values up to 19)."))
    checks: list[str] = Field(list(CHECKS), description=(
        "Which preconditions to measure: 'sfd' (fidelity decay), 'lgr' (informative lookahead rewards), "
        "'privileged' (an informative trace), 'alignment' (nodes in every P_succ bin)."))
    split: Literal["train", "test"] = Field("test", description="Split the questions come from.")
    num_questions: int = Field(16, ge=1, description="Questions: the first N of the split.")
    samples_per_question: int = Field(2, ge=1, description="Student rollouts per question (shared by every check).")
    max_new_tokens: int = Field(96, ge=1, description="Token budget of every response and continuation.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts and continuations.")
    batch_size: int = Field(64, ge=1, description="Sequences generated at once.")
    sfd_bin_size: int = Field(8, ge=1, description="sfd: positions per bin of F(t).")
    sfd_min_bin_tokens: int = Field(16, ge=1, description="sfd: bins with fewer tokens are left out of the fit.")
    sfd_continuations: int = Field(4, ge=0, description="sfd: teacher continuations per cut prefix (0 = none).")
    sfd_num_cuts: int = Field(4, ge=1, description="sfd: cut positions, 0 to the 90th-percentile length.")
    lgr_nodes: int = Field(32, ge=1, description="lgr: trigger nodes measured (drawn at random among all).")
    lgr_k: int = Field(8, ge=2, description="lgr: K, the student's top-K candidates at a trigger node.")
    lgr_tau: float = Field(0.2, ge=0, description="lgr: the entropy threshold (nats) of a trigger position.")
    lgr_signal: Literal["max_p", "sampled_p", "neg_entropy", "perplexity"] = Field("max_p", description=(
        "lgr: the teacher confidence signal of r(k), as objective.lookahead.signal."))
    lgr_rollouts_per_candidate: int = Field(8, ge=1, description="lgr: student continuations per candidate (V_k).")
    lgr_floors: list[float] = Field([0.01, 0.02, 0.05, 0.1], description=(
        "lgr: std floors compared for objective.lookahead.norm='floor' and 'gate'."))
    alignment_depth_ratio: float = Field(2.0, gt=1, description="alignment: node depths floor(ratio^k) - 1.")
    alignment_rollouts_per_node: int = Field(8, ge=1, description="alignment: continuations estimating P_succ.")
    alignment_max_nodes_per_rollout: int | None = Field(None, ge=1, description="alignment: depth levels kept.")
    alignment_min_nodes: int = Field(20, ge=1, description=(
        "alignment: nodes a (P_succ bin, correct / incorrect) cell needs for the comparison to be read."))
    privileged: PrivilegedConfig = Field(default_factory=PrivilegedConfig, description=(
        "The trace views' template and rho (the partial view's share of the reasoning)."))
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples of every interval.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    chunk_size: int = Field(1024, ge=1, description="Positions per chunk of teacher scoring.")
    seed: int = Field(0, description="Seed of every sampler and of the bootstrap.")
    output: str = Field("runs/diagnose", description="Directory for diagnose.json.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")

    @field_validator("checks")
    @classmethod
    def _checks(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CHECKS]
        if unknown or not v:
            raise ValueError(f"unknown check(s) {unknown}; allowed: {', '.join(CHECKS)}" if unknown
                             else "give at least one check")
        return v

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, data):
        if isinstance(data, dict) and data.get("pair") is not None:
            preset = PAIR_PRESETS.get(data["pair"])
            if preset is not None:  # an unknown pair is refused by the field's Literal
                data = {**{k: v for k, v in preset.items() if k not in data}, **data}
        return data
