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

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from opdlab.checkpoint import (checkpoint_bytes, latest_checkpoint, load_latest_checkpoint, load_optimizer_state,
                               remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from opdlab.config import RunConfig, load_config, save_config
from opdlab.diagnostics.fidelity.measure import FidelityProbe
from opdlab.distributed import PreparedStudent, StudentDecoder, fsdp_units, make_accelerator
from opdlab.models.loading import check_compatible, load_model
from opdlab.models.logprobs import student_forward
from opdlab.models.prompts import check_completion_agreement, stop_token_ids
from opdlab.objectives import Objective, check_objective
from opdlab.rollout.lean import why_not_lean
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


class Preempted(TrainingError):
    """The run was asked to stop (SIGTERM, SIGINT) and wrote a checkpoint of the step it had reached."""

    def __init__(self, signal_name: str, step: int, ckpt_root: Path):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {ckpt_root / f'step-{step:06d}'}; "
                         f"`opdlab train CONFIG --resume` continues from there")


# The fields `--resume` may change: how long the run goes on, how often it saves, evaluates and logs, where it logs,
# its guards, and the machinery around it (threads, memory: micro-batches, chunks, activation recomputation, which
# leave the step's gradient as it is). Anything else (the models, the task, the objective, the learning rate,
# the rollout settings) shapes what the checkpoint's state means, and changing it is refused.
RESUMABLE = ("train.steps", "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.sample_every",
             "train.fidelity_every", "train.max_bad_steps", "train.max_update_ratio", "train.threads",
             "train.micro_batch_size", "train.gradient_checkpointing", "scoring.chunk_size", "scoring.packing",
             "task.allow_data_change", "rollout.kv_cache", "rollout.packed_linears", "rollout.decoder", "device",
             "run_dir", "eval.*", "fidelity.*", "track.*", "remote_teacher.*")


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resumable(name: str) -> bool:
    return any(name == r or (r.endswith(".*") and name.startswith(r[:-1])) for r in RESUMABLE)


def check_resume_config(saved_path: Path, cfg: RunConfig) -> list[str]:
    """The resumable fields `cfg` changes against the run's saved config (`field: old -> new`); a TrainingError
    naming every other changed field, which a resumed run cannot take."""
    try:
        saved = load_config(saved_path, [], RunConfig)
    except Exception as e:  # noqa: BLE001 - an unreadable record does not block a resume; say so
        print(f"--resume: cannot compare with {saved_path} ({e}); resuming with the config given", file=sys.stderr)
        return []
    old, new = _flat(saved.model_dump(mode="json", by_alias=True)), _flat(cfg.model_dump(mode="json", by_alias=True))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    refused = [c for c in changed if not resumable(c.split(":")[0])]
    if refused:
        raise TrainingError(f"--resume cannot change {', '.join(refused)} (the run in {saved_path.parent} was "
                            f"started with the old values, which its checkpoint's state depends on). A resumed run "
                            f"may change only {', '.join(RESUMABLE)}; start a new run (another run_dir) for the rest")
    return changed


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
    data_digest: str = ""  # `problems_digest` of the training problems
    start_step: int = 0
    bad_steps: int = 0
    update_snapshot: object | None = None  # the update guard's `opdlab.step.UpdateSnapshot`, kept between steps

    def autocast(self):
        """The context of every forward pass: bf16 autocast under bf16-mixed precision (`opdlab.runtime`)."""
        return autocast(self.cfg.train.precision, self.device)

    def student_forward(self, rollouts: Rollouts) -> StudentOutputs:
        """The student's differentiable log-probs of `rollouts`, through the prepared wrapper."""
        return student_forward(PreparedStudent(self.student, self.prepared), rollouts, self.vocab_size,
                               self.cfg.scoring.chunk_size, packing=self.cfg.scoring.packing)

    def save(self, step: int, model_state: dict, optimizer_state: dict) -> None:
        """Checkpoint `step` (main process; `model_state` / `optimizer_state` gathered by every process). A failed
        write (a full disk) is a TrainingError that says the previous checkpoint is intact."""
        try:
            self._save(step, model_state, optimizer_state)
        except OSError as e:
            previous = latest_checkpoint(self.ckpt_root)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no checkpoint was written yet"
            raise TrainingError(f"writing checkpoint step {step} under {self.ckpt_root} failed: {e}; {kept} and "
                                f"nothing half-written was left; free some space, then `--resume`") from None

    def _save(self, step: int, model_state: dict, optimizer_state: dict) -> None:
        save_checkpoint(self.ckpt_root, step, self.student, self.tokenizer, {
            "step": step, "data_position": self.stream.position, "data_digest": self.data_digest,
            "bad_steps": self.bad_steps,
            "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "rng": rng_state(self.generator),
            **({"ema_teacher": self.ema_teacher.state_dict()} if self.ema_teacher is not None else {})},
            keep=self.cfg.train.keep_checkpoints, model_state=model_state)


# what a run directory holds, and of which kind (the TensorBoard events are a directory of their own)
RUN_FILES = {"checkpoints": "dir", "config.yaml": "file", "metrics.jsonl": "file", "samples.jsonl": "file",
             "fidelity.jsonl": "file"}


def problems_digest(problems) -> str:
    """A digest of the training problems in order (question, answer, solution), kept in each checkpoint so that a
    resumed run notices data that changed under it."""
    h = hashlib.sha256()
    for p in problems:
        for part in (p.question, p.answer, p.solution or ""):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


def check_same_data(saved: str | None, now: str, cfg: RunConfig) -> None:
    """The resumed run's training problems against the digest its checkpoint recorded."""
    if saved is None:
        print("resume: this checkpoint does not record its training data; not checked", file=sys.stderr)
    elif saved != now and not cfg.task.allow_data_change:
        where = cfg.task.file.train_path if cfg.task.name == "file" else f"the {cfg.task.name} task"
        raise TrainingError(f"--resume: the training problems of {where} are not those the run started on (digest "
                            f"{saved[:12]} in the checkpoint, {now[:12]} now): the data changed since. Restore it, "
                            f"start a new run, or pass task.allow_data_change=true to go on with the new data")


def check_run_dir(run_dir: Path) -> None:
    """Before any compute: `run_dir` is a writable directory (made if missing) and nothing in it that a run writes
    is of the wrong kind (a file named `checkpoints`, a directory named `metrics.jsonl`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    for name, kind in RUN_FILES.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != (kind == "dir"):
            raise TrainingError(f"{path} should be a {'directory' if kind == 'dir' else 'file'} but is a "
                                f"{'directory' if path.is_dir() else 'file'}: move it away or choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run_dir {run_dir} is not writable ({e.strerror or e}): choose another run_dir") from None


def check_free_space(run_dir: Path, student) -> None:
    """Refuse to start when `run_dir`'s disk cannot hold one more checkpoint of `student`."""
    need, free = checkpoint_bytes(student), shutil.disk_usage(run_dir).free
    if free < need:
        raise TrainingError(f"{run_dir} has {free / 2**20:.0f} MiB free, and one checkpoint of this student needs "
                            f"about {need / 2**20:.0f} MiB (weights and optimizer state): free some space or "
                            f"choose another run_dir")


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
    # every process compares (before the main one rewrites the file), so that a refusal stops them all
    changes = check_resume_config(run_dir / "config.yaml", cfg) if resume and (run_dir / "config.yaml").is_file() \
        else []
    accelerator = make_accelerator(cfg.device)  # this process of `accelerate launch` / `torchrun`, or the only one
    main = accelerator.is_main_process
    if main:
        check_run_dir(run_dir)
        if removed := remove_stale_temporaries(ckpt_root):
            print(f"removed {removed} temporary checkpoint director{'y' if removed == 1 else 'ies'} left by an "
                  f"interrupted write in {ckpt_root}", file=sys.stderr)
        for change in changes:
            print(f"resume: {change}", file=sys.stderr)
        save_config(cfg, run_dir / "config.yaml")  # what runs, resumed or not
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(cfg.device)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)

    precision = cfg.train.precision  # resolved by `opdlab.train.resolve_defaults`
    if main:
        print(f"precision: {precision}; student on {device}", file=sys.stderr, flush=True)
    student, tokenizer = load_model(cfg.student, device, trainable=True, precision=precision, name="student")
    if main:
        check_free_space(run_dir, student)
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
    data_digest = problems_digest(train_problems)
    trained = [p for p in student.parameters() if p.requires_grad]  # a LoRA student's adapters alone
    optimizer = torch.optim.AdamW(trained, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=cfg.train.fused_optimizer or None)
    scheduler = make_scheduler(optimizer, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    start_step, bad_steps, state = 0, 0, None
    if resume:
        found = load_latest_checkpoint(ckpt_root, student)  # the whole model, before `prepare` shards it (FSDP)
        if found is None:
            raise TrainingError(f"--resume: no checkpoint (none that can be read) under {ckpt_root}")
        ckpt, state = found
        check_same_data(state.get("data_digest"), data_digest, cfg)
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
    if main and cfg.rollout.backend == "builtin":
        why = why_not_lean(student) if cfg.rollout.decoder == "auto" else "rollout.decoder=hf"
        print(f"rollouts: {'lean decoding step' if why is None else f'transformers forward ({why})'}",
              file=sys.stderr, flush=True)
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
               fidelity_probe=fidelity_probe, data_digest=data_digest, start_step=start_step, bad_steps=bad_steps)
