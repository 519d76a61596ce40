"""`opdlab diagnose alignment`: training-free gradient alignment diagnostics (docs/methods.md#gradient-alignment).

Before paying for a training run: does each distillation signal push the student's logits where its success
probability rises? For student rollouts on a task's questions (graded by the task's verifier), at nodes chosen at
exponentially spaced depths under a budget of targeted rollouts, this measures

    V_j      success value of each candidate token j (sampled ∪ student top-k ∪ every teacher's top-k): n targeted
             rollouts with j forced and the student continuing (`opdlab.diagnostics.alignment.targeted`)
    g*       the ideal logit gradient p_j (V_j - P_succ) on the renormalised candidate set
    d        each signal's descent direction -dL/dz, by autograd through the objective table's own functions
             (`opdlab.diagnostics.alignment.signals.descent_directions`), for each teacher / teacher context
    cos      alignment = cosine(g*, d) on the candidate set; optionally also in parameter space, J^T g* vs J^T d
             for the parameters matching `param_subset` (J = dz_C/dtheta at the node)

and writes RUN_DIR/alignment.json (every node's numbers, `opdlab.diagnostics.alignment.result`), a terminal table
and plots (`opdlab.diagnostics.alignment.report`, `opdlab.diagnostics.alignment.plots`); `opdlab report RUN_DIR`
redraws the plots from the JSON. The config is `opdlab.diagnostics.alignment.config.AlignmentConfig`; the
teachers / contexts compared (`teachers`, each 'MODEL' or 'MODEL+VIEW', e.g. 'teacher' or 'self+full') are
described in `opdlab.diagnostics.alignment.spec`.

    opdlab diagnose alignment                                          # built-in task, student and teacher
    opdlab diagnose alignment teachers=[teacher,self+full,self+partial] budget=40000 num_questions=32
    opdlab diagnose alignment CONFIG.yaml key=value ...
"""
from __future__ import annotations

import time

import torch
from rich.console import Console
from tqdm.auto import tqdm

from opdlab.diagnostics.alignment.config import AlignmentConfig
from opdlab.diagnostics.alignment.nodes import measure_nodes
from opdlab.diagnostics.alignment.plots import plot_alignment
from opdlab.diagnostics.alignment.report import p_succ_table, summarise, summary_table
from opdlab.diagnostics.alignment.result import save_result
from opdlab.diagnostics.alignment.spec import TeacherSpec, parse_spec
from opdlab.models.loading import check_compatible, load_model
from opdlab.models.prompts import stop_token_ids
from opdlab.objectives import OBJECTIVES, as_objective
from opdlab.rollout.builtin import sample
from opdlab.rollout.masking import masked_token_ids, with_loss_mask
from opdlab.tasks import make_task
from opdlab.teacher.views import view_text

CONFIG = AlignmentConfig


def run_alignment(cfg: AlignmentConfig, console=None, progress: bool = True) -> dict:
    """Measure, write RUN_DIR/alignment.json and the plots, print the table; returns the JSON dict."""
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
    json_path = save_result(result, cfg.run_dir)
    console.print(summary_table(result))
    console.print(p_succ_table(result))
    paths = plot_alignment(result, cfg.run_dir, examples=cfg.example_rollouts)
    console.print(f"wrote {json_path} and {', '.join(str(p) for p in paths)} "
                  f"({timing['total_s']:.0f} s, {timing['targeted_rollouts']} targeted rollouts)")
    return result


def _needs_traces(cfg: AlignmentConfig, specs: list[TeacherSpec]) -> bool:
    """Whether a teacher view or a signal (one that scores both views itself) needs Problem.solution."""
    two_views = any(getattr(as_objective(OBJECTIVES[s]).teacher_request(cfg.objective.model_copy(update={"name": s})),
                            "both_views", False) for s in cfg.signals)
    return two_views or any(s.view in ("full", "partial") for s in specs)


def run_diagnostic(cfg: AlignmentConfig, console=None) -> dict:
    """`opdlab diagnose alignment [CONFIG.yaml] [key=value ...]` (`opdlab.cli`)."""
    return run_alignment(cfg, console=console)

