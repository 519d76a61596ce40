"""The on-policy distillation loop: sample prompts -> student rollouts -> teacher scores -> objective -> step.

    opdlab train CONFIG.yaml [key=value ...] [--resume]

`train()` below is the whole loop, top to bottom; each stage is one named helper of `opdlab.step`, and the run's
state (models, optimizer, data stream, logger) is built and checkpointed by `opdlab.run`. The objective is looked up
by name in the objective table (`opdlab.objectives`) and called with one signature, so methods differ only in that
function and in what its table entry asks the teacher for; the loop never branches on the objective.

The same loop runs as one process or as several under `accelerate launch` (DDP or FSDP2): each process takes its
share of the step's prompts, losses are weighted by the global loss-token count, metrics are summed over processes,
and the main process alone evaluates, logs and writes checkpoints. The teacher may be served over HTTP
(`remote_teacher.url`) and rollouts may come from vLLM (`rollout.backend`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from opdlab.checkpoint import full_state
from opdlab.config import RunConfig
from opdlab.objectives import get_objective
from opdlab.distributed import global_sum
from opdlab.run import Preempted, TrainingError, build_run
from opdlab.runtime import StopSignals, resolve_device, resolve_precision, threads_pinned
from opdlab.step import (accumulate_gradients, apply_update, batch_counts, evaluate_and_probe, sample_rollouts,
                         score_rollouts, step_metrics, with_rewards)

__all__ = ["Preempted", "TrainingError", "resolve_defaults", "train"]


def resolve_defaults(cfg: RunConfig) -> RunConfig:
    """`cfg` with the defaults that depend on the objective or the machine filled in, as the run directory records
    them: rollout.top_p = None -> the objective's default top-p; train.precision = auto -> what this device runs
    fast (`opdlab.runtime.resolve_precision`). A copy when anything changes."""
    objective = get_objective(cfg.objective.name)
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.device))
    if cfg.rollout.top_p is not None and precision == cfg.train.precision:
        return cfg
    cfg = cfg.model_copy(deep=True)
    if cfg.rollout.top_p is None:
        cfg.rollout.top_p = objective.default_top_p
    cfg.train.precision = precision
    return cfg


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run directory. SIGTERM or SIGINT ends the step under way, writes a
    checkpoint and raises `Preempted` (the CLI exits with `PREEMPTED_EXIT_CODE`)."""
    with StopSignals() as stop, threads_pinned(cfg.train.threads):
        return _train(cfg, resume, progress, stop)


def _train(cfg: RunConfig, resume: bool, progress: bool, stop: StopSignals) -> Path:
    run = build_run(resolve_defaults(cfg), resume)
    cfg = run.cfg
    bar = tqdm(range(run.start_step, cfg.train.steps), initial=run.start_step, total=cfg.train.steps,
               desc=cfg.objective.name, disable=not progress or not run.main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # 1. rollouts from the current student (or, for GKD's off-policy share, the task's reference responses)
        problems, rollouts, on_policy = sample_rollouts(run, step)
        rewards = run.task.verify_batch(problems, rollouts.texts)
        rollouts = with_rewards(run, rollouts, rewards, on_policy)  # group-normalised, for objective.reward_weight
        t1 = time.perf_counter()
        # 2. the teacher's view of every sampled token, plus what the objective asked for
        scores = score_rollouts(run, rollouts)
        t2 = time.perf_counter()
        # 3. loss and update, normalised by the loss-token count of the whole batch
        totals = accumulate_gradients(run, rollouts, scores)
        totals, counts = totals.reduce(run.accelerator, batch_counts(rollouts, rewards, scores,
                                                                     cfg.rollout.samples_per_prompt))
        grad_norm = apply_update(run, totals.loss, step)
        t3 = time.perf_counter()

        # 4. metrics (the task's own behaviour metrics on student rollouts only), evaluation, logging, checkpoint
        diagnostics = run.task.rollout_diagnostics(problems, rollouts.texts) if on_policy else {}
        metrics = step_metrics(run, totals, counts, on_policy=on_policy, grad_norm=grad_norm,
                               times=(t0, t1, t2, t3), diagnostics=diagnostics)
        stopping = global_sum(run.accelerator, stop.requested, run.device) > 0  # a signal on any process
        saving = stopping or (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps
        model_state, optimizer_state = full_state(run.student, run.optimizer) if saving else ({}, {})
        metrics.update(evaluate_and_probe(run, step))
        if run.main:
            run.logger.log(step + 1, metrics)
            if (step + 1) % cfg.train.sample_every == 0 or step == run.start_step:
                run.logger.samples(step + 1, rollouts, rewards, scores)
            bar.set_postfix(loss=f"{totals.loss:.3f}", rkl=f"{metrics.get('train/reverse_kl', 0):.3f}",
                            reward=f"{metrics.get('train/reward', math.nan):.2f}")
            if saving:
                run.save(step + 1, model_state, optimizer_state)
        if stopping and step + 1 < cfg.train.steps:  # every process together, once the checkpoint is written
            run.accelerator.wait_for_everyone()
            raise Preempted(stop.name or "a signal to another process", step + 1, run.ckpt_root)
    run.accelerator.wait_for_everyone()
    if run.main:
        run.logger.close()
    return run.run_dir
