"""`opdlab diagnose alignment`: training-free gradient alignment diagnostics (METHODS.md section 4).

Before paying for a training run: does each distillation signal push the student's logits where its success
probability rises? For student rollouts on a task's questions (graded by the task's verifier), at nodes chosen at
exponentially spaced depths under a budget of targeted rollouts, this measures

    V_j      success value of each candidate token j (sampled ∪ student top-k ∪ every teacher's top-k): n targeted
             rollouts with j forced and the student continuing (`alignment_targeted`)
    g*       the ideal logit gradient p_j (V_j - P_succ) on the renormalised candidate set
    d        each signal's descent direction -dL/dz, by autograd through the objective table's own functions
             (`alignment_signals.descent_directions`), for each teacher / teacher context
    cos      alignment = cosine(g*, d) on the candidate set; optionally also in parameter space, J^T g* vs J^T d
             for the parameters matching `param_subset` (J = dz_C/dtheta at the node)

and writes RUN_DIR/alignment.json (every node's numbers), a terminal table and plots (`alignment_report`,
`alignment_plots`); `opdlab report RUN_DIR` redraws the plots from the JSON.

Teachers / contexts (`teachers`), each 'MODEL' or 'MODEL+VIEW': MODEL is 'teacher' (the model at teacher.path) or
'self' (the student itself, frozen, as a self-teacher); VIEW is 'none' (the student's prompt, the default),
'full' / 'partial' (the prompt with the whole oracle trace / its first `privileged.rho` plus the answer line,
built by `opdlab.privileged`) or 'summary' (the same template with only the trace's final-answer line: a summary of
the solution [R]: the summariser is not specified, so the summary is the result alone). Signals that score both
views themselves (the AR-OPD objectives, `TeacherRequest.both_views`) use the spec's MODEL under the full and
partial views; the spec's VIEW does not apply to them.

    opdlab diagnose alignment                                          # built-in task, student and teacher
    opdlab diagnose alignment teachers=[teacher,self+full,self+partial] budget=40000 num_questions=32
    python -m opdlab.diagnostics.alignment CONFIG.yaml key=value ...
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from opdlab.config import ModelConfig, ObjectiveConfig, PrivilegedConfig, TaskConfig, _Section

ALIGNMENT_FILE = "alignment.json"
MODELS = ("teacher", "self")
SPEC_VIEWS = ("none", "full", "partial", "summary")


class AlignmentConfig(_Section):
    """A gradient alignment diagnostic run (`opdlab diagnose alignment`)."""

    student: ModelConfig = Field(default_factory=ModelConfig, description="The student whose rollouts are probed.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The external teacher ('teacher' in `teachers`).")
    task: TaskConfig = Field(default_factory=lambda: TaskConfig(min_steps=2, max_steps=3, max_value=19), description=(
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
        "{none, full, partial, summary} (see the module docstring)."))
    signals: list[str] = Field(["opd", "reverse_kl", "forward_kl", "jsd", "lsm"], description=(
        "Distillation signals: objective-table names (`opdlab objectives`); their settings come from `objective`."))
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description=(
        "Settings shared by every signal (top_k, beta, support, ...); `objective.name` is ignored."))
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
        from opdlab.objectives import OBJECTIVES
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


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher / context: which model scores, under which view of the question."""

    name: str
    model: str  # 'teacher' | 'self'
    view: str  # 'none' | 'full' | 'partial' | 'summary'


def parse_spec(text: str) -> TeacherSpec:
    model, _, view = text.partition("+")
    view = view or "none"
    if model not in MODELS or view not in SPEC_VIEWS:
        raise ValueError(f"teacher spec {text!r}: expected MODEL or MODEL+VIEW with MODEL in {{{', '.join(MODELS)}}} "
                         f"and VIEW in {{{', '.join(SPEC_VIEWS)}}}, e.g. 'teacher' or 'self+full'")
    return TeacherSpec(text, model, view)


def spec_prompt_ids(tokenizer, rollouts, spec: TeacherSpec, cfg: PrivilegedConfig):
    """(ids_B_P, mask_B_P) of the teacher's prompts under the spec's view."""
    from opdlab.privileged import split_trace, view_prompt_ids
    from opdlab.prompts import encode_prompts, render_prompt
    if spec.view != "summary":
        return view_prompt_ids(tokenizer, rollouts, spec.view, cfg)
    texts = []
    for p in rollouts.problems:
        answer_line = split_trace(p.solution)[1] if p.solution else ""
        texts.append(render_prompt(tokenizer, cfg.template.format(question=p.question,
                                                                  trace=answer_line or f"Answer: {p.answer}")))
    ids, mask = encode_prompts(tokenizer, texts)
    return ids.to(rollouts.prompt_ids_B_P.device), mask.to(rollouts.prompt_ids_B_P.device)


def run_alignment(cfg: AlignmentConfig, console=None, progress: bool = True) -> dict:
    """Measure, write RUN_DIR/alignment.json and the plots, print the table; returns the JSON dict."""
    from rich.console import Console

    from opdlab.diagnostics.alignment_nodes import measure_nodes
    from opdlab.diagnostics.alignment_plots import plot_alignment
    from opdlab.diagnostics.alignment_report import p_succ_table, summarise, summary_table
    from opdlab.masking import masked_token_ids, with_loss_mask
    from opdlab.models import check_compatible, load_model
    from opdlab.prompts import stop_token_ids
    from opdlab.rollout import sample
    from opdlab.tasks import make_task

    console = console or Console()
    t0 = time.perf_counter()
    specs = [parse_spec(s) for s in cfg.teachers]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    student, tokenizer = load_model(cfg.student, device)
    models = {"self": student}
    vocab_size, teacher_tok = student.get_output_embeddings().weight.shape[0], tokenizer
    if any(s.model == "teacher" for s in specs):
        teacher, teacher_tok = load_model(cfg.teacher, device)
        vocab_size = check_compatible(student, tokenizer, teacher, teacher_tok).vocab_size
        models["teacher"] = teacher
    task = make_task(cfg.task)
    split = task.problems(cfg.split)
    if len(split) < cfg.num_questions:
        raise ValueError(f"num_questions={cfg.num_questions} but the {cfg.split} split of task {cfg.task.name!r} "
                         f"holds {len(split)} problems")
    problems = [split[i] for i in range(cfg.num_questions) for _ in range(cfg.samples_per_question)]
    if _needs_traces(cfg, specs):  # fail before sampling when a question has no oracle trace
        from opdlab.privileged import view_text
        for p in problems[::cfg.samples_per_question]:
            view_text(p, "full", cfg.privileged)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stops = stop_token_ids(student, tokenizer)
    masked = masked_token_ids(tokenizer, teacher_tok, cfg.objective.mask_tokens, cfg.objective.auto_mask, keep=stops)

    parts = []
    for start in tqdm(range(0, len(problems), cfg.batch_size), desc="rollouts", disable=not progress):
        parts.append(sample(student, tokenizer, problems[start:start + cfg.batch_size],
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            generator=generator, vocab_size=vocab_size))
    rollouts = [with_loss_mask(part.select([i]), masked) for part in parts for i in range(len(part.problems))]
    rewards = [task.verify(r.problems[0], r.texts[0]) for r in rollouts]
    t_rollouts = time.perf_counter() - t0

    nodes, rollout_records, timing = measure_nodes(
        cfg, specs, models, tokenizer, task, rollouts, rewards, vocab_size, stops, generator, progress=progress)
    timing = {"rollouts_s": t_rollouts, **timing, "total_s": time.perf_counter() - t0}
    result = {"config": cfg.model_dump(mode="json"), "teachers": cfg.teachers, "signals": cfg.signals,
              "rollouts": rollout_records, "nodes": nodes, "timing": timing}
    result["summary"] = summarise(result, n_boot=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ALIGNMENT_FILE).write_text(json.dumps(_clean(result), separators=(",", ":")))
    console.print(summary_table(result))
    console.print(p_succ_table(result))
    paths = plot_alignment(result, run_dir, examples=cfg.example_rollouts)
    console.print(f"wrote {run_dir / ALIGNMENT_FILE} and {', '.join(str(p) for p in paths)} "
                  f"({timing['total_s']:.0f} s, {timing['targeted_rollouts']} targeted rollouts)")
    return result


def _needs_traces(cfg: AlignmentConfig, specs: list[TeacherSpec]) -> bool:
    """Whether a teacher view or a signal (one that scores both views itself) needs Problem.solution."""
    from opdlab.objectives import OBJECTIVES, as_objective
    two_views = any(getattr(as_objective(OBJECTIVES[s]).teacher_request(cfg.objective.model_copy(update={"name": s})),
                            "both_views", False) for s in cfg.signals)
    return two_views or any(s.view in ("full", "partial") for s in specs)


def _clean(x):
    """JSON-safe: NaN / inf become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def load_result(run_dir: str | Path) -> dict:
    path = Path(run_dir) / ALIGNMENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ALIGNMENT_FILE} in {run_dir}: run `opdlab diagnose alignment` first")
    return json.loads(path.read_text())


CONFIG = AlignmentConfig


def run_diagnostic(cfg: AlignmentConfig, console=None) -> dict:
    """`opdlab diagnose alignment [CONFIG.yaml] [key=value ...]` (`opdlab.cli`)."""
    return run_alignment(cfg, console=console)


if __name__ == "__main__":
    import sys

    from opdlab.cli import main
    raise SystemExit(main(["diagnose", "alignment", *sys.argv[1:]]))
