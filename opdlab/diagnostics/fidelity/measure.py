"""Supervision fidelity decay: how confident the teacher stays as the student's prefix grows
(docs/methods.md#supervision-fidelity-decay).

    opdlab diagnose fidelity [CONFIG.yaml] [key=value ...]     # writes OUTPUT/fidelity.json and OUTPUT/fidelity.png
    opdlab diagnose fidelity --help                            # every field, with its default

On the first `fidelity.num_prompts` problems of a task split (the same problems every time):

1. The student and the teacher each sample `samples_per_prompt` rollouts. The teacher scores both sets, and its
   fidelity F(t) = max_v pi_T(v | x, y_<t) at every completion position t (0-based: F at t = 0 is conditioned on
   the prompt alone) is averaged per bin of `bin_size` positions: F on student prefixes vs F on its own prefixes.
   Late bins hold only the rollouts that got that far, so each bin reports its token and rollout counts.
2. Teacher continuation accuracy: each student rollout long enough is cut after its first t tokens, for every cut
   position t, and the teacher samples `continuations` completions from there (a `max_continuations` budget,
   shared equally by the cuts); the task's verifier scores prefix + continuation. t = 0 is the teacher alone.
   The teacher continues from the student's exact prefix tokens, not from re-encoded text
   (`opdlab.diagnostics.fidelity.continuation`).
3. A logistic `floor + amplitude / (1 + exp(slope * (t - midpoint)))` is fitted to each F(t) curve (bins with at
   least `min_bin_tokens` tokens, weighted by their token counts; `opdlab.diagnostics.fidelity.fit`), with R^2.

The teacher scores with the student's rendered prompt, as in training. In training, `FidelityProbe` repeats this
on the current student every `train.fidelity_every` steps (teacher rollouts sampled once and reused), logs a few
`fidelity/*` numbers and appends the whole measurement to RUN_DIR/fidelity.jsonl.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from rich.console import Console
from tqdm.auto import tqdm

from opdlab.config import FidelityConfig, ModelConfig, TaskConfig, TeacherScoringConfig, _Section
from opdlab.diagnostics.fidelity.continuation import batch_slices, choose_cuts, continuation_accuracy
from opdlab.diagnostics.fidelity.fit import LogisticFit, fit_logistic
from opdlab.diagnostics.fidelity.report import fidelity_tables, plot_fidelity
from opdlab.diagnostics.fidelity.result import FidelityResult, PositionBin, SideResult
from opdlab.models.loading import check_compatible, load_model
from opdlab.models.prompts import render_prompt
from opdlab.rollout.builtin import sample
from opdlab.tasks import make_task
from opdlab.tasks.base import Task
from opdlab.teacher.scoring import score
from opdlab.tracking import _truncate_jsonl
from opdlab.types import Problem, Rollouts


class FidelityRunConfig(_Section):
    """`opdlab diagnose fidelity`: one measurement of a student/teacher pair on a task."""

    student: ModelConfig = Field(default_factory=ModelConfig, description="The model whose prefixes are measured.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The model whose fidelity is measured.")
    task: TaskConfig = Field(default_factory=lambda: TaskConfig(arithmetic=dict(max_steps=3,
                                                                                max_value=19)), description=(
        "Problems and verifier (default: the built-in arithmetic task as the demo sets it, 2-3 steps, values "
        "up to 19)."))
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig, description="What is measured, and how much.")
    scoring: TeacherScoringConfig = Field(default_factory=TeacherScoringConfig, description="Teacher scoring.")
    seed: int = Field(0, description="Seed of every sampler and of the choice of cut prefixes.")
    output: str = Field("runs/fidelity", description="Directory for fidelity.json and fidelity.png.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")


CONFIG = FidelityRunConfig


def token_fidelity(teacher, rollouts: Rollouts, vocab_size: int, chunk_size: int = 1024):
    """(position_N, fidelity_N, entropy_N, row_N) numpy arrays over every completion token of `rollouts`."""
    scores = score(teacher, rollouts, vocab_size, chunk_size=chunk_size)
    mask_B_T = rollouts.completion_mask_B_T.bool().cpu()
    B, T = mask_B_T.shape
    pos_B_T = torch.arange(T).expand(B, T)
    row_B_T = torch.arange(B)[:, None].expand(B, T)
    return (pos_B_T[mask_B_T].numpy(), scores.maxp_B_T.cpu()[mask_B_T].double().numpy(),
            scores.entropy_B_T.cpu()[mask_B_T].double().numpy(), row_B_T[mask_B_T].numpy())


def bin_positions(position_N, fidelity_N, entropy_N, row_N, bin_size: int) -> list[PositionBin]:
    """Per-bin means of F and entropy over positions [b * bin_size, (b + 1) * bin_size), up to the last token."""
    position_N = np.asarray(position_N)
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    if len(position_N) == 0:
        return []
    bins = []
    bin_N = position_N // bin_size
    for b in range(int(bin_N.max()) + 1):
        sel = bin_N == b
        n = int(sel.sum())
        bins.append(PositionBin(
            start=b * bin_size, end=(b + 1) * bin_size, tokens=n, rollouts=len(np.unique(np.asarray(row_N)[sel])),
            mean_position=float(position_N[sel].mean()) if n else None,
            fidelity=float(np.asarray(fidelity_N)[sel].mean()) if n else None,
            entropy=float(np.asarray(entropy_N)[sel].mean()) if n else None))
    return bins


def fit_bins(bins: list[PositionBin], min_tokens: int) -> LogisticFit | None:
    """The logistic fit of a binned F(t) curve over bins holding at least `min_tokens` tokens."""
    full = [b for b in bins if b.tokens >= min_tokens]
    return fit_logistic([b.mean_position for b in full], [b.fidelity for b in full], [b.tokens for b in full])


def _sample_side(source: str, model, teacher, tokenizer, task: Task, problems: list[Problem], prompts: list[str],
                 cfg: FidelityConfig, *, generator, vocab_size, chunk_size, progress, keep_texts: int = 4):
    """Rollouts of `model`, teacher-scored and binned, as a SideResult."""
    parts, completions, texts, rewards = [], [], [], []
    for mb in tqdm(batch_slices(len(problems), cfg.batch_size), desc=f"{source} rollouts", disable=not progress,
                   leave=False):
        r = sample(model, tokenizer, problems[mb], prompts=prompts[mb], max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, generator=generator, vocab_size=vocab_size)
        pos, fid, ent, row = token_fidelity(teacher, r, vocab_size, chunk_size)
        parts.append((pos, fid, ent, row + len(completions)))
        ids_B_T, mask_B_T = r.completion_ids_B_T.cpu(), r.completion_mask_B_T.cpu().bool()
        completions += [ids[m].tolist() for ids, m in zip(ids_B_T, mask_B_T)]
        texts += r.texts
        rewards += [float(task.verify(p, text)) for p, text in zip(problems[mb], r.texts)]
    pos, fid, ent, row = (np.concatenate(x) for x in zip(*parts))
    bins = bin_positions(pos, fid, ent, row, cfg.bin_size)
    per_rollout = [fid[row == i][np.argsort(pos[row == i])].tolist() for i in range(len(completions))]
    return SideResult(source=source, bins=bins, fit=fit_bins(bins, cfg.min_bin_tokens),
                      accuracy=float(np.mean(rewards)), mean_length=float(np.mean([len(c) for c in completions])),
                      rollouts=len(completions), texts=texts[:keep_texts], completions=completions, rewards=rewards,
                      token_fidelity=per_rollout)


def select_problems(task: Task, cfg: FidelityConfig) -> list[Problem]:
    pool = task.problems(cfg.split)
    if len(pool) == 0:
        raise ValueError(f"fidelity: task {task.name!r} has no {cfg.split!r} problems")
    if len(pool) < cfg.num_prompts:
        warnings.warn(f"fidelity: task {task.name!r} has only {len(pool)} {cfg.split!r} problems; using all of "
                      f"them instead of {cfg.num_prompts}", stacklevel=2)
    return [pool[i] for i in range(min(cfg.num_prompts, len(pool)))]


@torch.no_grad()
def measure_fidelity(student, teacher, tokenizer, task: Task, cfg: FidelityConfig, *, seed: int = 0,
                     vocab_size: int | None = None, chunk_size: int = 1024, teacher_side: SideResult | None = None,
                     progress: bool = True) -> FidelityResult:
    """Steps 1-3 of the module docstring. `teacher_side`: reuse an earlier measurement's teacher rollouts (they do
    not depend on the student). Every stage draws from its own generator seeded from `seed`, so a measurement is
    reproducible whether or not the teacher side is reused, and the caller's random state is left alone."""
    start = time.perf_counter()
    device = next(student.parameters()).device
    if vocab_size is None:  # the token ids both models score (as opdlab.models.loading.check_compatible)
        vocab_size = min(m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    problems = [p for p in select_problems(task, cfg) for _ in range(cfg.samples_per_prompt)]
    prompts = [render_prompt(tokenizer, p.question) for p in problems]
    gens = [torch.Generator(device=device).manual_seed(seed * 1000 + i) for i in range(3)]
    common = dict(vocab_size=vocab_size, chunk_size=chunk_size, progress=progress)
    student_side = _sample_side("student", student, teacher, tokenizer, task, problems, prompts, cfg,
                                generator=gens[0], **common)
    if teacher_side is None:
        teacher_side = _sample_side("teacher", teacher, teacher, tokenizer, task, problems, prompts, cfg,
                                    generator=gens[1], **common)
    cuts = []
    if cfg.continuations > 0:
        cut_at = choose_cuts([len(c) for c in student_side.completions], cfg)
        cuts = continuation_accuracy(teacher, tokenizer, task, problems, prompts, student_side.completions,
                                     student_side.rewards, cut_at, cfg, generator=gens[2],
                                     rng=np.random.default_rng(seed), vocab_size=vocab_size, progress=progress)
    info = {"task": task.name, "split": cfg.split, "problems": len(problems) // cfg.samples_per_prompt,
            "samples_per_prompt": cfg.samples_per_prompt, "seed": seed, "config": cfg.model_dump(mode="json"),
            "wall_s": time.perf_counter() - start}
    return FidelityResult(student=student_side, teacher=teacher_side, cuts=cuts, min_bin_tokens=cfg.min_bin_tokens,
                          info=info)


class FidelityProbe:
    """The measurement above inside training: `probe(student, step)` returns the `fidelity/*` metrics and appends
    the whole measurement to RUN_DIR/fidelity.jsonl. Every call uses the same problems and the same seed, so two
    steps differ by the student's weights, not by sampling luck; the teacher's rollouts are sampled again only when
    the teacher's weights change (an EMA self-teacher). On a resumed run, records after `start_step` are dropped
    first, as for metrics.jsonl."""

    def __init__(self, teacher, tokenizer, task: Task, cfg: FidelityConfig, *, run_dir: str | Path, seed: int = 0,
                 vocab_size: int | None = None, chunk_size: int = 1024, start_step: int = 0):
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError(f"train.fidelity_every needs a teacher model in this process (it samples and scores "
                             f"with it); got {type(teacher).__name__}")
        self.teacher, self.tokenizer, self.task, self.cfg = teacher, tokenizer, task, cfg
        self.seed, self.vocab_size, self.chunk_size = seed, vocab_size, chunk_size
        self.path = Path(run_dir) / "fidelity.jsonl"
        if start_step == 0:
            self.path.unlink(missing_ok=True)
        else:
            _truncate_jsonl(self.path, start_step)
        self._teacher_side: SideResult | None = None
        self._teacher_fingerprint = None

    def _fingerprint(self) -> tuple[float, ...]:
        params = list(self.teacher.parameters())
        return tuple(float(p.detach().double().sum()) for p in (params[0], params[-1]))

    def __call__(self, student, step: int) -> dict[str, float]:
        fingerprint = self._fingerprint()
        reuse = self._teacher_side if fingerprint == self._teacher_fingerprint else None
        result = measure_fidelity(student, self.teacher, self.tokenizer, self.task, self.cfg, seed=self.seed,
                                  vocab_size=self.vocab_size, chunk_size=self.chunk_size, teacher_side=reuse,
                                  progress=False)
        self._teacher_side, self._teacher_fingerprint = result.teacher, fingerprint
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **result.to_dict()}) + "\n")
        return result.summary_metrics()


def run_diagnostic(cfg: FidelityRunConfig, console=None) -> FidelityResult:
    """`opdlab diagnose fidelity`: measure, print the tables, write OUTPUT/fidelity.json and OUTPUT/fidelity.png."""
    console = console or Console()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    student, tokenizer = load_model(cfg.student, device)
    teacher, teacher_tokenizer = load_model(cfg.teacher, device)
    pairing = check_compatible(student, tokenizer, teacher, teacher_tokenizer)
    result = measure_fidelity(student, teacher, tokenizer, make_task(cfg.task), cfg.fidelity, seed=cfg.seed,
                              vocab_size=pairing.vocab_size, chunk_size=cfg.scoring.chunk_size)
    result.info.update(student=cfg.student.path, teacher=cfg.teacher.path, run_config=cfg.model_dump(mode="json"))
    out = Path(cfg.output)
    json_path = result.save(out / "fidelity.json")
    png_path = plot_fidelity(result, out / "fidelity.png",
                             title=f"{cfg.teacher.path} on {cfg.student.path}'s prefixes ({cfg.task.name})")
    for table in fidelity_tables(result):
        console.print(table)
    console.print(f"wrote {json_path} and {png_path}")
    return result
