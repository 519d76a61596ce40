"""A training run's state: everything the loop in `opdlab.train` works with, built from its config, restored from
its last checkpoint and saved into the next one.

    run = build_run(cfg, resume)          # models, teacher, task, sampler, optimizer, logger; resumed if asked
    run.save(step, model_state, optimizer_state)

The same run is built in every process of `accelerate launch` / `torchrun` (DDP or FSDP2): the student's
differentiable forward goes through the prepared wrapper (`run.prepared`); sampling, evaluation and checkpoints use
the plain model (`run.student`), inside `full_params(run.prepared)` where FSDP holds it in shards. Only the main
process logs and writes checkpoints (whole, gathered from every process's shard), which any process count that
divides `rollout.prompts_per_step` resumes (`opdlab.distributed`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from opdlab.checkpoint import (latest_checkpoint, load_checkpoint, load_optimizer_state, rng_state, save_checkpoint,
                               set_rng_state)
from opdlab.config import RunConfig, load_config, save_config
from opdlab.diagnostics.fidelity.measure import FidelityProbe
from opdlab.distributed import PreparedStudent, StudentDecoder, fsdp_units, make_accelerator
from opdlab.models.loading import check_compatible, load_model
from opdlab.models.logprobs import student_forward
from opdlab.models.prompts import check_completion_agreement, stop_token_ids
from opdlab.objectives import Objective, check_objective
from opdlab.rollout.masking import masked_token_ids, special_token_ids
from opdlab.rollout.samplers import Sampler, make_sampler
from opdlab.runtime import autocast, make_scheduler, resolve_device, seed_everything, set_threads
from opdlab.tasks import Task, make_task
from opdlab.tasks.base import ProblemStream
from opdlab.teacher.remote import connect_teacher
from opdlab.teacher.self_teacher import EMATeacher, make_teacher
from opdlab.tracking import MetricsLogger, check_trackers
from opdlab.types import Rollouts, StudentOutputs, TeacherRequest


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last checkpoint is intact."""


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run's config from YAML + dotted overrides (`opdlab.config.load_config`), with its objective's name checked
    against the objective table: every problem with the config is a `ConfigError` before anything is computed."""
    cfg = load_config(path, overrides, RunConfig)
    check_objective(cfg.objective)
    check_trackers(cfg.track)
    return cfg


@dataclass
class Run:
    """What one process of a run holds. `start_step`, `bad_steps`, the stream's position, the generator, the
    optimizer, the scheduler and the EMA teacher are what a checkpoint restores."""

    cfg: RunConfig
    run_dir: Path
    ckpt_root: Path
    accelerator: Accelerator
    device: torch.device
    main: bool  # the process that logs and writes checkpoints
    student: torch.nn.Module
    tokenizer: object
    teacher_tokenizer: object  # the student's, unless the teacher was loaded with a prompt format of its own
    prepared: torch.nn.Module  # the student's decoder inside the DDP / FSDP wrapper (or as it is, in one process)
    teacher: object  # a model, or a RemoteTeacher
    ema_teacher: EMATeacher | None
    vocab_size: int
    task: Task
    objective: Objective
    teacher_request: TeacherRequest
    masked_ids: set[int]
    stream: ProblemStream
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # GKD's on/off-policy draws
    sampler: Sampler
    logger: MetricsLogger | None  # main process only
    fidelity_probe: FidelityProbe | None
    start_step: int = 0
    bad_steps: int = 0

    def autocast(self):
        """The context of every forward pass: bf16 autocast under bf16-mixed precision (`opdlab.runtime`)."""
        return autocast(self.cfg.train.precision, self.device)

    def student_forward(self, rollouts: Rollouts) -> StudentOutputs:
        """The student's differentiable log-probs of `rollouts`, through the prepared wrapper."""
        return student_forward(PreparedStudent(self.student, self.prepared), rollouts, self.vocab_size,
                               self.cfg.scoring.chunk_size)

    def save(self, step: int, model_state: dict, optimizer_state: dict) -> None:
        """Checkpoint `step` (main process; `model_state` / `optimizer_state` gathered by every process)."""
        save_checkpoint(self.ckpt_root, step, self.student, self.tokenizer, {
            "step": step, "data_position": self.stream.position, "bad_steps": self.bad_steps,
            "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.generator),
            **({"ema_teacher": self.ema_teacher.state_dict()} if self.ema_teacher is not None else {})},
            keep=self.cfg.train.keep_checkpoints, model_state=model_state)


def _load_teacher(cfg: RunConfig, student, tokenizer, device):
    """(teacher, EMA teacher or None, teacher tokenizer): served over HTTP, loaded from teacher.path, or a copy of
    the student (privileged self-teachers, `opdlab.teacher.self_teacher`)."""
    if cfg.remote_teacher.url:  # served over HTTP (opdlab serve-teacher, vLLM): never loaded here
        return connect_teacher(cfg), None, tokenizer
    if cfg.privileged.teacher == "external":
        teacher, teacher_tokenizer = load_model(cfg.teacher, device, precision=cfg.train.precision, name="teacher")
        return teacher, None, teacher_tokenizer
    teacher, ema_teacher = make_teacher(cfg.privileged, student, cfg.train.precision)
    return teacher, ema_teacher, tokenizer


def build_run(cfg: RunConfig, resume: bool = False) -> Run:
    """Everything a run needs, in this process; with `resume`, restored from the latest checkpoint."""
    check_objective(cfg.objective)
    check_trackers(cfg.track)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                            f"or choose another run_dir")
    accelerator = make_accelerator(cfg.device)  # this process of `accelerate launch` / `torchrun`, or the only one
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(cfg.device)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)

    precision = cfg.train.precision  # resolved by `opdlab.train.resolve_defaults`
    if main:
        print(f"precision: {precision}; student on {device}", file=sys.stderr, flush=True)
    student, tokenizer = load_model(cfg.student, device, trainable=True, precision=precision, name="student")
    if cfg.train.gradient_checkpointing:  # sampling runs in eval mode, where transformers keeps the KV cache
        student.activation_checkpointing_enable()
    teacher, ema_teacher, teacher_tokenizer = _load_teacher(cfg, student, tokenizer, device)
    pairing = check_compatible(student, tokenizer, student if cfg.remote_teacher.url else teacher, teacher_tokenizer)
    task = make_task(cfg.task)
    objective = check_objective(cfg.objective)
    train_problems = task.problems("train")
    # the two chat templates must render a completion alike (up to special tokens, which are then masked)
    probe = train_problems[0] if len(train_problems) else None
    templates_agree = probe is None or check_completion_agreement(
        tokenizer, teacher_tokenizer, probe.question, task.target(probe),
        special_token_ids(tokenizer) | special_token_ids(teacher_tokenizer) if cfg.objective.auto_mask else set())
    masked_ids = masked_token_ids(tokenizer, teacher_tokenizer, cfg.objective.mask_tokens, cfg.objective.auto_mask,
                                  keep=stop_token_ids(student, tokenizer), templates_agree=templates_agree)
    stream = ProblemStream(train_problems, seed=cfg.task.seed)
    trained = [p for p in student.parameters() if p.requires_grad]  # a LoRA student's adapters alone
    optimizer = torch.optim.AdamW(trained, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    start_step, bad_steps, state = 0, 0, None
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint under {ckpt_root}")
        state = load_checkpoint(ckpt, student)  # the whole model, before `prepare` shards it (FSDP)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generator)
        stream.position, start_step, bad_steps = state["data_position"], state["step"], state["bad_steps"]
        if ema_teacher is not None:
            ema_teacher.load_state_dict(state["ema_teacher"])
    prepared, optimizer = accelerator.prepare(StudentDecoder(student), optimizer)
    if state is not None:  # after `prepare`, which under FSDP replaces the parameters by their shards
        load_optimizer_state(student, optimizer, state["optimizer"])
    if cfg.student.lora.r and fsdp_units(prepared):
        raise ValueError("a LoRA student (student.lora.r > 0) is not supported under FSDP: its checkpoints hold the "
                         "adapters alone, which FSDP would hold in shards. Use DDP (`accelerate launch "
                         "--multi_gpu`), where each process keeps the whole (frozen) base")
    if cfg.rollout.backend == "vllm" and fsdp_units(prepared):
        raise ValueError("rollout.backend=vllm is not supported under FSDP: the weight push after each step reads "
                         "the student's state_dict, which FSDP holds in shards. Use DDP (`accelerate launch "
                         "--multi_gpu`) with vLLM, or the built-in sampler (rollout.backend=builtin) with FSDP")
    sampler = make_sampler(cfg.rollout, student, tokenizer, pairing.vocab_size, cfg.student.path)
    logger = MetricsLogger(run_dir, start_step=start_step, track=cfg.track,
                           config=cfg.model_dump(mode="json", by_alias=True)) if main else None
    fidelity_probe = None  # supervision fidelity decay on the current student's prefixes (opdlab.diagnostics)
    if cfg.train.fidelity_every and main:
        fidelity_probe = FidelityProbe(teacher, tokenizer, task, cfg.fidelity, run_dir=run_dir, seed=cfg.train.seed,
                                       vocab_size=pairing.vocab_size, chunk_size=cfg.scoring.chunk_size,
                                       start_step=start_step)
    return Run(cfg=cfg, run_dir=run_dir, ckpt_root=ckpt_root, accelerator=accelerator, device=device, main=main,
               student=student, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, prepared=prepared,
               teacher=teacher, ema_teacher=ema_teacher,
               vocab_size=pairing.vocab_size, task=task, objective=objective,
               teacher_request=objective.teacher_request(cfg.objective), masked_ids=masked_ids, stream=stream,
               optimizer=optimizer, scheduler=scheduler, generator=generator, sampler=sampler, logger=logger,
               fidelity_probe=fidelity_probe, start_step=start_step, bad_steps=bad_steps)
