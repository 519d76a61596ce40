"""The on-policy distillation loop: sample prompts -> student rollouts -> teacher scores -> objective -> step.

    opdlab train CONFIG.yaml [key=value ...] [--resume]

Everything a step does is in `train()` below, top to bottom; the objective is looked up by name in
`opdlab.objectives.OBJECTIVES` and called with one signature, so methods differ only in that function (and in what
its table entry asks the teacher for). With `objective.gkd_lambda` < 1 a step trains, with probability
1 - lambda, on the task's reference responses instead of student rollouts (GKD), a draw from the run's seeded
sampler so a resumed run makes the same choices. Special tokens are masked out of every objective's loss
(`opdlab.masking`).

The same loop runs as one process or as several under `accelerate launch` (DDP or FSDP2): each process takes its share
of the step's prompts, every rollout row draws from its own seeded generator, losses are weighted by the global
loss-token count, metrics are summed over processes, and the main process alone logs and writes checkpoints (whole,
gathered from every process's shard under FSDP), which any process count that divides `rollout.prompts_per_step`
resumes (`opdlab.distributed`). Whatever calls the plain student (sampling, evaluation) runs inside
`full_params(prepared)`, which gathers FSDP-sharded parameters and does nothing otherwise. The teacher may be
served over HTTP (`remote_teacher.url`, `opdlab.remote_teacher`) and rollouts may come from vLLM
(`rollout.backend`, `opdlab.samplers`).
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.checkpoint import (full_state, latest_checkpoint, load_checkpoint, load_optimizer_state, rng_state,
                               save_checkpoint, set_rng_state)
from opdlab.config import RunConfig, save_config
from opdlab.distributed import (PreparedStudent, StudentDecoder, fsdp_units, full_params, global_sum, loss_scale,
                                make_accelerator, row_seeds, shard, sum_dicts)
from opdlab.hindsight import rollout_diagnostics
from opdlab.logprobs import student_forward
from opdlab.models import check_compatible, load_model
from opdlab.masking import masked_token_ids, with_loss_mask
from opdlab.objectives import OBJECTIVES, as_objective
from opdlab.privileged import make_teacher, score_views
from opdlab.prompts import stop_token_ids
from opdlab.remote_teacher import connect_teacher
from opdlab.rollout import reference_rollouts
from opdlab.samplers import make_sampler
from opdlab.tasks import make_task
from opdlab.tasks.base import ProblemStream
from opdlab.tracking import MetricsLogger


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last checkpoint is intact."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        floor = cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return floor + (1.0 - floor) * max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batches(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def resolve_defaults(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with the objective-dependent defaults filled in (rollout.top_p = None -> the objective's
    default top-p), as the run directory records it."""
    if cfg.rollout.top_p is not None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.top_p = as_objective(OBJECTIVES[cfg.objective.name]).default_top_p
    return cfg


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run directory."""
    cfg = resolve_defaults(cfg)
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
    seed_everything(cfg.train.seed)

    student, tokenizer = load_model(cfg.student, device, trainable=True)
    ema_teacher = None  # privileged self-teachers: a frozen or EMA copy of the initial student (opdlab.privileged)
    if cfg.remote_teacher.url:  # served over HTTP (opdlab serve-teacher, vLLM): never loaded here
        teacher, teacher_tokenizer = connect_teacher(cfg), tokenizer
    elif cfg.privileged.teacher == "external":
        teacher, teacher_tokenizer = load_model(cfg.teacher, device)
    else:
        (teacher, ema_teacher), teacher_tokenizer = make_teacher(cfg.privileged, student), tokenizer
    pairing = check_compatible(student, tokenizer, student if cfg.remote_teacher.url else teacher, teacher_tokenizer)
    task = make_task(cfg.task)
    objective = as_objective(OBJECTIVES[cfg.objective.name])
    teacher_request = objective.teacher_request(cfg.objective)
    masked_ids = masked_token_ids(tokenizer, teacher_tokenizer, cfg.objective.mask_tokens, cfg.objective.auto_mask,
                                  keep=stop_token_ids(student, tokenizer))
    stream = ProblemStream(task.problems("train"), seed=cfg.task.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    start_step, bad_steps = 0, 0

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
    # the differentiable forward goes through the DDP / FSDP wrapper; sampling, eval and checkpoints use `student`
    prepared, optimizer = accelerator.prepare(StudentDecoder(student), optimizer)
    if resume:  # after `prepare`, which under FSDP replaces the parameters by their shards
        load_optimizer_state(student, optimizer, state["optimizer"])
    if cfg.rollout.backend == "vllm" and fsdp_units(prepared):
        raise ValueError("rollout.backend=vllm is not supported under FSDP: the weight push after each step reads "
                         "the student's state_dict, which FSDP holds in shards. Use DDP (`accelerate launch "
                         "--multi_gpu`) with vLLM, or the built-in sampler (rollout.backend=builtin) with FSDP")
    trained = PreparedStudent(student, prepared)
    sampler = make_sampler(cfg.rollout, student, tokenizer, pairing.vocab_size, cfg.student.path)
    logger = MetricsLogger(run_dir, start_step=start_step) if main else None
    # supervision fidelity decay of the teacher on the current student's prefixes (opdlab.diagnostics.fidelity)
    fidelity_probe = None
    if cfg.train.fidelity_every and main:
        from opdlab.diagnostics.fidelity import FidelityProbe
        fidelity_probe = FidelityProbe(teacher, tokenizer, task, cfg.fidelity, run_dir=run_dir, seed=cfg.train.seed,
                                       vocab_size=pairing.vocab_size, chunk_size=cfg.scoring.chunk_size,
                                       start_step=start_step)

    bar = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
               desc=cfg.objective.name, disable=not progress or not main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # 1. rollouts from the current student (or, for GKD's off-policy share, the task's reference responses)
        # this process's share of the step's prompts; row r of the global batch samples with seed (seed, step, r)
        prompts, first = shard(stream.take(cfg.rollout.prompts_per_step), accelerator.num_processes,
                               accelerator.process_index)
        problems = [p for p in prompts for _ in range(cfg.rollout.samples_per_prompt)]
        on_policy = cfg.objective.gkd_lambda >= 1 or \
            torch.rand(1, generator=generator, device=device).item() < cfg.objective.gkd_lambda
        with full_params(prepared):  # FSDP: the student's parameters gathered around sampling (no-op otherwise)
            if on_policy:
                rollouts = sampler.sample(problems, row_seeds(cfg.train.seed, step,
                                                              first * cfg.rollout.samples_per_prompt, len(problems)))
            else:
                rollouts = reference_rollouts(student, tokenizer, problems, [task.target(p) for p in problems],
                                              max_new_tokens=cfg.rollout.max_new_tokens,
                                              vocab_size=pairing.vocab_size, chunk_size=cfg.scoring.chunk_size)
        rollouts = with_loss_mask(rollouts, masked_ids)
        rewards = task.verify_batch(problems, rollouts.texts)
        t1 = time.perf_counter()
        # 2. the teacher's view of every sampled token (plus what the objective asked for: top-K, hidden states)
        # under the teacher's context(s): privileged.view (by default the student's own prompt), or both views of
        # the oracle trace in one pass when the objective asks for them (scores.partial); the lookahead objective
        # also gets the student's top-K candidates at its high-entropy positions scored one step ahead, in the
        # same teacher passes (opdlab.tree_attention)
        views = ("full", "partial") if teacher_request.both_views else (cfg.privileged.view,)
        with full_params(prepared, enabled=teacher_request.lookahead is not None):  # lookahead runs the student
            scores = score_views(teacher, tokenizer, rollouts, views, cfg.privileged, pairing.vocab_size,
                                 top_k=max(cfg.scoring.top_k, teacher_request.top_k),
                                 chunk_size=cfg.scoring.chunk_size, keep_hidden=teacher_request.hidden,
                                 lookahead=teacher_request.lookahead,
                                 student=student if teacher_request.lookahead is not None else None)
        t2 = time.perf_counter()
        # 3. loss and update, accumulated over micro-batches, normalised by the loss-token count of the whole batch,
        # every process's share included (the loss is scaled by the process count because DDP averages gradients)
        optimizer.zero_grad(set_to_none=True)
        total_tokens = max(global_sum(accelerator, rollouts.num_loss_tokens, device), 1)
        metric_sums: dict[str, float] = {}
        metric_weights: dict[str, float] = {}
        loss_total, student_entropy = 0.0, 0.0
        for mb in micro_batches(len(problems), cfg.train.micro_batch_size):
            r_mb = rollouts.select(mb)
            weight = r_mb.num_loss_tokens / total_tokens
            s_mb = student_forward(trained, r_mb, pairing.vocab_size, cfg.scoring.chunk_size)
            out = objective(r_mb, s_mb, scores.select(mb), cfg.objective)
            (out.loss * (weight * loss_scale(accelerator))).backward()
            student_entropy += (s_mb.entropy_B_T * r_mb.loss_mask_B_T).sum().item() / total_tokens
            loss_total += out.loss.item() * weight
            for k, v in out.metrics.items():  # a micro-batch may lack a metric (e.g. an empty position bucket)
                metric_sums[k] = metric_sums.get(k, 0.0) + v * weight
                metric_weights[k] = metric_weights.get(k, 0.0) + weight
        # the step's numbers summed over processes: token-weighted shares, plus counts for the batch means below
        mask_B_T = rollouts.completion_mask_B_T.bool()
        total = sum_dicts(accelerator, {
            "loss": loss_total, "student_entropy": student_entropy, "rows": len(problems), "reward": sum(rewards),
            "tokens": rollouts.num_tokens, "loss_tokens": rollouts.num_loss_tokens,
            "teacher_entropy": scores.entropy_B_T[mask_B_T].sum().item(),
            "teacher_maxp": scores.maxp_B_T[mask_B_T].sum().item(),
            **{f"sum:{k}": v for k, v in metric_sums.items()}, **{f"weight:{k}": v for k, v in metric_weights.items()}})
        loss_total = total["loss"]
        step_metrics = {k: total[f"sum:{k}"] / total[f"weight:{k}"] for k in metric_sums if total[f"weight:{k}"] > 0}
        grad_norm = accelerator.clip_grad_norm_(prepared.parameters(), cfg.train.grad_clip).item()
        if math.isfinite(loss_total) and math.isfinite(grad_norm):
            optimizer.step()
            bad_steps = 0
            if ema_teacher is not None:
                with full_params(prepared):
                    ema_teacher.update(student)
            sampler.push_weights(student)  # a vLLM engine samples the next step from the new weights
        else:  # never let a NaN/inf reach the weights: skip the update, stop if it keeps happening
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            tqdm.write(f"step {step + 1}: non-finite loss {loss_total} / grad norm {grad_norm}; update skipped")
            if bad_steps >= cfg.train.max_bad_steps:
                raise TrainingError(f"{bad_steps} consecutive non-finite steps (last at step {step + 1}); "
                                    f"weights are those of the last good step, checkpoint in {ckpt_root}")
        scheduler.step()
        t3 = time.perf_counter()

        metrics = {
            "train/loss": loss_total, **step_metrics,
            # reward of student rollouts only: a GKD step on reference responses logs none
            **({"train/reward": total["reward"] / total["rows"]} if on_policy else {}),
            "train/on_policy": float(on_policy),
            "train/response_len": total["tokens"] / total["rows"],
            "train/masked_frac": 1.0 - total["loss_tokens"] / max(total["tokens"], 1),
            "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
            "train/skipped": float(bad_steps > 0),
            "teacher/entropy": total["teacher_entropy"] / max(total["tokens"], 1),
            "teacher/maxp": total["teacher_maxp"] / max(total["tokens"], 1),
            "student/entropy": total["student_entropy"],
            "perf/tokens_per_s": total["tokens"] / (t3 - t0),
            "perf/rollout_s": t1 - t0, "perf/teacher_s": t2 - t1, "perf/update_s": t3 - t2,
            # hindsight leakage and step errors against the oracle trace (opdlab.hindsight), student rollouts only
            **(rollout_diagnostics(problems, rollouts.texts) if on_policy else {}),
        }
        # the main process alone evaluates, logs and saves; every process takes part in gathering what FSDP shards
        evaluating = bool(cfg.train.eval_every) and (step + 1) % cfg.train.eval_every == 0
        probing = bool(cfg.train.fidelity_every) and (step + 1) % cfg.train.fidelity_every == 0
        saving = (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps
        model_state, optimizer_state = full_state(student, optimizer) if saving else ({}, {})
        with full_params(prepared, enabled=evaluating or probing):
            if main and evaluating:
                from opdlab.evaluate import evaluate
                result = evaluate(student, tokenizer, task, cfg.eval, seed=cfg.train.seed,
                                  vocab_size=pairing.vocab_size, progress=False)
                metrics[f"eval/mean@{cfg.eval.k}"] = result.mean_at_k
                metrics[f"eval/pass@{cfg.eval.k}"] = result.pass_at_k
                metrics.update({f"eval/mean@{cfg.eval.k}_len_{b.label}": b.mean_reward for b in result.buckets
                                if b.mean_reward is not None})  # by response length (eval.length_buckets)
            if fidelity_probe is not None and probing:
                metrics.update(fidelity_probe(student, step + 1))
        if not main:
            continue
        logger.log(step + 1, metrics)
        if (step + 1) % cfg.train.sample_every == 0 or step == start_step:
            logger.samples(step + 1, rollouts, rewards, scores)
        bar.set_postfix(loss=f"{loss_total:.3f}", rkl=f"{metrics.get('train/reverse_kl', 0):.3f}",
                        reward=f"{metrics.get('train/reward', math.nan):.2f}")

        if saving:
            save_checkpoint(ckpt_root, step + 1, student, tokenizer, {
                "step": step + 1, "data_position": stream.position, "bad_steps": bad_steps,
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": rng_state(generator),
                **({"ema_teacher": ema_teacher.state_dict()} if ema_teacher is not None else {})},
                keep=cfg.train.keep_checkpoints, model_state=model_state)
    accelerator.wait_for_everyone()
    if main:
        logger.close()
    return run_dir

