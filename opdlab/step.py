"""The stages of a training step, one helper each; `opdlab.train` calls them in order.

    problems, rollouts, on_policy = sample_rollouts(run, step)   # 1. the student's rollouts (or GKD's references)
    rollouts = with_rewards(run, rollouts, rewards, on_policy)   #    their group-normalised task rewards
    scores = score_rollouts(run, rollouts)                       # 2. the teacher's view of every sampled token
    totals = accumulate_gradients(run, rollouts, scores)         # 3. loss.backward() per micro-batch
    grad_norm = apply_update(run, totals.loss, step)             #    the guarded optimizer step
    metrics = step_metrics(run, ...)                             # 4. what the step logs
    metrics.update(evaluate_and_probe(run, step))                #    periodic evaluation and fidelity probe

Every micro-batch's loss is weighted by its share of the loss tokens of the whole step (every process's rollouts
included), so the gradient does not depend on `train.micro_batch_size` or the process count. `StepTotals` collects
what the step logs (the token-weighted loss, the student's entropy, the objective's own metrics) and sums it over
processes in one exchange.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from opdlab.distributed import full_params, global_sum, loss_scale, row_seeds, shard, sum_dicts
from opdlab.evaluate import evaluate
from opdlab.objectives.common import group_normalised_rewards
from opdlab.rollout.builtin import reference_rollouts
from opdlab.rollout.masking import with_loss_mask
from opdlab.run import Run, TrainingError
from opdlab.teacher.scoring import score
from opdlab.teacher.views import score_views
from opdlab.types import Problem, Rollouts, TeacherScores


def sample_rollouts(run: Run, step: int) -> tuple[list[Problem], Rollouts, bool]:
    """This process's share of the step's prompts, `rollout.samples_per_prompt` rollouts each, from the current
    student; with `objective.gkd_lambda` < 1, with probability 1 - lambda (a draw from the run's seeded generator,
    so a resumed run makes the same choice) the task's reference responses instead. Special tokens are masked out
    of the loss (`opdlab.rollout.masking`). Row r of the global batch samples with seed (train.seed, step, r)."""
    cfg, acc = run.cfg, run.accelerator
    prompts, first = shard(run.stream.take(cfg.rollout.prompts_per_step), acc.num_processes, acc.process_index)
    n = cfg.rollout.samples_per_prompt
    problems = [p for p in prompts for _ in range(n)]
    on_policy = cfg.objective.gkd_lambda >= 1 or \
        torch.rand(1, generator=run.generator, device=run.device).item() < cfg.objective.gkd_lambda
    # FSDP: the student's parameters gathered around sampling (a no-op otherwise)
    with full_params(run.prepared), run.autocast():
        if on_policy:
            rollouts = run.sampler.sample(problems, row_seeds(cfg.train.seed, step, first * n, len(problems)))
        else:
            rollouts = reference_rollouts(run.student, run.tokenizer, problems,
                                          [run.task.target(p) for p in problems],
                                          max_new_tokens=cfg.rollout.max_new_tokens, vocab_size=run.vocab_size,
                                          chunk_size=cfg.scoring.chunk_size)
    return problems, with_loss_mask(rollouts, run.masked_ids), on_policy


def with_rewards(run: Run, rollouts: Rollouts, rewards: list[float], on_policy: bool) -> Rollouts:
    """The rollouts with their task rewards normalised within each prompt's group of `rollout.samples_per_prompt`
    rows (`Rollouts.reward_advantage_B`, GRPO's advantage) when `objective.reward_weight` > 0; a prompt's rows are
    consecutive and on one process. On GKD's reference-response steps the term is 0: those are not samples of the
    student, and a policy gradient on them would be off-policy."""
    cfg = run.cfg
    if not cfg.objective.reward_weight:
        return rollouts
    rewards_B = torch.tensor(rewards, dtype=torch.float32, device=run.device)
    adv_B = group_normalised_rewards(rewards_B, cfg.rollout.samples_per_prompt, cfg.objective.reward_norm) \
        if on_policy else torch.zeros_like(rewards_B)
    return replace(rollouts, reward_advantage_B=adv_B)


def score_rollouts(run: Run, rollouts: Rollouts) -> TeacherScores:
    """The teacher's scores of every sampled token, plus what the objective asked for (top-K, hidden states, the
    lookahead candidates' rewards). On the student's own prompt by default (the teacher's own rendering of it where
    the teacher has a prompt format of its own); under `privileged.view`, or both views of the oracle trace in one
    pass when the objective asks for them (`opdlab.teacher.views`). A full-vocabulary objective computes the
    teacher's token statistics at the loss positions itself, from the logits it makes there anyway;
    `accumulate_gradients` writes them into the scores (`TeacherScores.fill_pending`). The lookahead objective has
    the student propose its candidates, so the student's parameters are gathered for it under FSDP."""
    cfg, request = run.cfg, run.teacher_request
    kwargs = dict(top_k=max(cfg.scoring.top_k, request.top_k), chunk_size=cfg.scoring.chunk_size,
                  packing=cfg.scoring.packing, keep_hidden=request.hidden, lookahead=request.lookahead,
                  student=run.student if request.lookahead is not None else None)
    views = ("full", "partial") if request.both_views else (cfg.privileged.view,)
    # a teacher with a prompt format of its own (system prompt, template, template variables) gets its own prompt
    own_prompt = run.teacher_tokenizer.chat_template != run.tokenizer.chat_template
    with full_params(run.prepared, enabled=request.lookahead is not None), run.autocast():
        if views == ("none",) and not own_prompt:
            if request.stats_from_objective and kwargs["top_k"] == 0 and isinstance(run.teacher, torch.nn.Module):
                kwargs["pending_B_T"] = rollouts.loss_mask_B_T  # the objective makes those logits anyway
            return score(run.teacher, rollouts, run.vocab_size, **kwargs)
        return score_views(run.teacher, run.teacher_tokenizer, rollouts, views, cfg.privileged, run.vocab_size,
                           own_prompt=own_prompt, **kwargs)


def micro_batches(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class StepTotals:
    """A step's token-weighted sums: after `reduce`, the loss and student entropy are the step's means over loss
    tokens, and `metrics` the token-weighted mean of each objective metric over the micro-batches that reported it
    (a micro-batch may lack one, e.g. an empty position bucket)."""

    loss: float = 0.0
    student_entropy: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, entropy: float, metrics: dict[str, float], weight: float) -> None:
        self.loss += loss * weight
        self.student_entropy += entropy
        for k, v in metrics.items():
            self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v * weight
            self.metric_weights[k] = self.metric_weights.get(k, 0.0) + weight

    @property
    def metrics(self) -> dict[str, float]:
        return {k: self.metric_sums[k] / w for k, w in self.metric_weights.items() if w > 0}

    def reduce(self, accelerator, counts: dict[str, float]) -> tuple[StepTotals, dict[str, float]]:
        """These totals and `counts` (batch sums such as rows and tokens) summed over processes, in one exchange."""
        flat = {"loss": self.loss, "student_entropy": self.student_entropy, **counts,
                **{("sum", k): v for k, v in self.metric_sums.items()},
                **{("weight", k): v for k, v in self.metric_weights.items()}}
        total = sum_dicts(accelerator, flat)
        reduced = StepTotals(total.pop("loss"), total.pop("student_entropy"),
                             {k[1]: total.pop(k) for k in list(total) if isinstance(k, tuple) and k[0] == "sum"},
                             {k[1]: total.pop(k) for k in list(total) if isinstance(k, tuple) and k[0] == "weight"})
        return reduced, total


def accumulate_gradients(run: Run, rollouts: Rollouts, scores: TeacherScores) -> StepTotals:
    """Zero the gradients, then the objective's loss and its backward pass micro-batch by micro-batch."""
    cfg = run.cfg
    run.optimizer.zero_grad(set_to_none=True)  # the loss-token count of the whole step, every process included
    total_tokens = max(global_sum(run.accelerator, rollouts.num_loss_tokens, run.device), 1)
    totals = StepTotals()
    for mb in micro_batches(len(rollouts.problems), cfg.train.micro_batch_size):
        r_mb = rollouts.select(mb)
        weight = r_mb.num_loss_tokens / total_tokens
        with run.autocast():  # the backward runs outside autocast, as torch recommends
            s_mb = run.student_forward(r_mb)
            out = run.objective(r_mb, s_mb, scores.select(mb), cfg.objective)
        # DDP averages gradients over processes: scaled by the process count, the loss is a sum over all tokens
        (out.loss * (weight * loss_scale(run.accelerator))).backward()
        if scores.pending_B_T is not None:  # the teacher statistics `score` left to the objective
            scores.fill_pending(mb, out.teacher_stats or {})
        entropy = (s_mb.entropy_B_T * r_mb.loss_mask_B_T).sum().item() / total_tokens
        totals.add(out.loss.item(), entropy, out.metrics, weight)
    return totals


class UpdateSnapshot:
    """The trained parameters and their optimizer state as they were before an update, so that a bad update can be
    undone exactly. Under FSDP each process keeps its own shards.

    `take()` copies them; with `keep` the copies go into the buffers of the take before, allocated once. On a CPU
    that is what a run does: on the SmolLM2 student (113M parameters and twice as much Adam state, 2 threads)
    copying into kept buffers took 0.09-0.11 s, against 0.19-0.40 s for fresh copies, which fault their memory in
    anew each step. On a GPU fresh copies are cheaper in memory: the allocator hands them to the next step's
    activations, where kept buffers would hold three times the weights through the forward and backward passes."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer, keep: bool = False) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
        self.params = params
        self.keep = keep
        self.values: list[torch.Tensor] = []
        self.states: list[dict | None] = []
        self.take()

    def take(self) -> None:
        """Copy the parameters and their optimizer state as they are now."""
        reuse = self.keep and len(self.values) == len(self.params)
        with torch.no_grad():
            if reuse:
                for value, p in zip(self.values, self.params):
                    value.copy_(p.detach())
            else:
                self.values = [p.detach().clone() for p in self.params]
            states = []
            for i, p in enumerate(self.params):
                live = self.optimizer.state.get(p)  # (a defaultdict: `get` adds no entry)
                kept = self.states[i] if reuse else None
                states.append(None if live is None else _copy_state(live, kept))
            self.states = states

    def restore(self) -> None:
        """Put back the parameters and optimizer state of the last take. The state's copies become the optimizer's
        (no copy), and the state they replace becomes the buffer the next take writes into."""
        with torch.no_grad():
            for i, (p, value, state) in enumerate(zip(self.params, self.values, self.states)):
                p.copy_(value)
                if state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.states[i], self.optimizer.state[p] = self.optimizer.state.get(p), state

    def change_ratio(self, accelerator, device) -> float:
        """||W_new - W_old|| / ||W_old|| over every process's trained parameters (inf when a weight is not finite)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # one host sync for all parameters, not two each
        with torch.no_grad():
            for p, old in zip(self.params, self.values):
                new_local, old_local = _local(p.detach()), _local(old)
                if old_local.numel():
                    sums[0] += sum_of_squares(new_local - old_local)
                    sums[1] += sum_of_squares(old_local)
        diff2, norm2 = (global_sum(accelerator, v, device) for v in sums.tolist())
        return math.sqrt(diff2 / norm2) if math.isfinite(diff2) and norm2 > 0 else math.inf


def _copy_state(live: dict, kept: dict | None) -> dict:
    """A copy of one parameter's optimizer state, written into `kept` where it has the same entries and shapes."""
    same = kept is not None and kept.keys() == live.keys() and all(
        not torch.is_tensor(v) or (torch.is_tensor(kept[k]) and kept[k].shape == v.shape and kept[k].dtype == v.dtype)
        for k, v in live.items())
    if not same:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in live.items()}
    for k, v in live.items():
        if torch.is_tensor(v):
            kept[k].copy_(v)
        else:
            kept[k] = v
    return kept


SQUARES_PIECE = 1 << 16


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t ** 2) as a float64 scalar, without a float64 copy of `t`: fp32 norms of pieces of 65,536 elements,
    summed in float64. One fp32 norm of a whole 28M-element tensor was off by 3.5e-3 (relative) from the float64
    sum, these pieces by 4e-7, at about the same speed (6 ms, 2 threads); a float64 copy took 100 ms."""
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    if not flat.numel():
        return flat.new_zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(list(flat.split(SQUARES_PIECE)))
    return torch.stack(norms).double().pow(2).sum()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard (DTensor): this process's part


def weights_finite(params: list[torch.nn.Parameter], accelerator, device) -> bool:
    """Whether every trained parameter is finite on every process. A NaN or an infinity makes a tensor's norm
    non-finite, so one norm a tensor settles it; only a tensor whose norm is not finite (which a finite one's can be
    too, by overflow) has its elements checked. On the SmolLM2 student (113M parameters, 2 CPU threads) that took
    0.017 s a step against 0.22 s for checking every element."""
    local = [t for t in (_local(p.detach()) for p in params) if t.numel()]
    bad = 0
    if local:
        norms_n = torch.stack([torch.linalg.vector_norm(t).float() for t in local])
        if not bool(torch.isfinite(norms_n).all()):
            suspects = torch.nonzero(~torch.isfinite(norms_n)).flatten().tolist()
            bad = int(sum((~torch.isfinite(local[i])).sum() for i in suspects).item())
    return global_sum(accelerator, bad, device) == 0


def apply_update(run: Run, loss: float, step: int) -> float:
    """Clip, then step the optimizer, unless the loss or the gradient is not finite; with `train.max_update_ratio`
    > 0 an update that makes a weight non-finite or moves the weights by more than that fraction of their norm is
    undone (weights and optimizer state). Such a step is skipped and `train.max_bad_steps` in a row stop the run.
    The EMA self-teacher and a vLLM sampler follow the new weights. Returns the gradient norm."""
    cfg = run.cfg
    grad_norm = run.accelerator.clip_grad_norm_(run.prepared.parameters(), cfg.train.grad_clip).item()
    problem = None if math.isfinite(loss) and math.isfinite(grad_norm) else \
        f"non-finite loss {loss} / grad norm {grad_norm}"
    if problem is None:
        params = [p for p in run.prepared.parameters() if p.requires_grad]
        snapshot = None
        if cfg.train.max_update_ratio:
            snapshot = run.update_snapshot
            if snapshot is None or len(snapshot.params) != len(params) or \
                    any(a is not b for a, b in zip(snapshot.params, params)):
                snapshot = UpdateSnapshot(params, run.optimizer, keep=run.device.type == "cpu")
                run.update_snapshot = snapshot if snapshot.keep else None
            else:
                snapshot.take()
        run.optimizer.step()
        if snapshot is None:
            if not weights_finite(params, run.accelerator, run.device):
                raise TrainingError(f"step {step + 1}: the update made some weights non-finite (train.lr "
                                    f"{run.scheduler.get_last_lr()[0]:g}); nothing was saved after it, the last "
                                    f"checkpoint in {run.ckpt_root} is intact. Lower train.lr, or set "
                                    f"train.max_update_ratio > 0 to skip such updates")
        else:
            ratio = snapshot.change_ratio(run.accelerator, run.device)
            if not ratio <= cfg.train.max_update_ratio:
                # (an fp32 norm overflows beyond ~1e19 a weight: the weights can be finite with the ratio not)
                finite = math.isfinite(ratio) or weights_finite(params, run.accelerator, run.device)
                snapshot.restore()
                problem = ("the update would have made weights non-finite" if not finite else
                           f"the update would have moved the weights by {ratio:.3g} of their norm "
                           f"(train.max_update_ratio {cfg.train.max_update_ratio:g})")
    if problem is None:
        run.bad_steps = 0
        if run.ema_teacher is not None:
            with full_params(run.prepared):
                run.ema_teacher.update(run.student)
        run.sampler.push_weights(run.student)  # a vLLM engine samples the next step from the new weights
    else:  # never let a NaN/inf or a runaway update reach the weights
        run.optimizer.zero_grad(set_to_none=True)
        run.bad_steps += 1
        tqdm.write(f"step {step + 1}: {problem}; update skipped")
        if run.bad_steps >= cfg.train.max_bad_steps:
            raise TrainingError(f"{run.bad_steps} bad steps in a row (last at step {step + 1}: {problem}); the "
                                f"weights are those before them, and the last checkpoint in {run.ckpt_root} is "
                                f"intact. Lower train.lr or look at the loss")
    run.scheduler.step()
    return grad_norm


def step_metrics(run: Run, totals: StepTotals, counts: dict[str, float], *, on_policy: bool, grad_norm: float,
                 times: tuple[float, float, float, float], diagnostics: dict[str, float]) -> dict[str, float]:
    """The step's logged numbers: `train/*` (loss, reward, lengths, gradient, lr), `teacher/*`, `student/*`,
    `perf/*` and the objective's and the task's own metrics. `totals` and `counts` are summed over processes."""
    t0, t1, t2, t3 = times
    tokens, rows = counts["tokens"], counts["rows"]
    return {
        "train/loss": totals.loss, **totals.metrics,
        **({"train/reward": counts["reward"] / rows} if on_policy else {}),  # GKD's reference responses: none
        **({"train/reward_group_std": counts["reward_group_std"] / counts["reward_groups"],
            "train/reward_flat_frac": counts["reward_flat_groups"] / counts["reward_groups"]}
           if on_policy and counts.get("reward_groups") else {}),
        "train/on_policy": float(on_policy),
        "train/response_len": tokens / rows,
        "train/masked_frac": 1.0 - counts["loss_tokens"] / max(tokens, 1),
        "train/grad_norm": grad_norm, "train/lr": run.scheduler.get_last_lr()[0],
        "train/skipped": float(run.bad_steps > 0),
        "teacher/entropy": counts["teacher_entropy"] / max(tokens, 1),
        "teacher/maxp": counts["teacher_maxp"] / max(tokens, 1),
        "student/entropy": totals.student_entropy,
        "perf/tokens_per_s": tokens / (t3 - t0),
        "perf/rollout_s": t1 - t0, "perf/teacher_s": t2 - t1, "perf/update_s": t3 - t2,
        **diagnostics,
    }


def batch_counts(rollouts: Rollouts, rewards: list[float], scores: TeacherScores, group_size: int = 1
                 ) -> dict[str, float]:
    """This process's sums for the step's batch means (rows, reward, tokens, the teacher's entropy and max-p); with
    several samples per prompt (`group_size`), the groups' reward std (1/(n-1)) and the count of groups whose
    rewards are all equal, which give a group-normalised reward term nothing to learn from."""
    mask_B_T = rollouts.completion_mask_B_T.bool()
    groups = {}
    if group_size > 1 and rewards:
        r_G_N = torch.tensor(rewards, dtype=torch.float64).reshape(-1, group_size)
        groups = {"reward_groups": r_G_N.shape[0], "reward_group_std": r_G_N.std(-1).sum().item(),
                  "reward_flat_groups": (r_G_N == r_G_N[:, :1]).all(-1).sum().item()}
    return {**groups, "rows": len(rollouts.problems), "reward": sum(rewards), "tokens": rollouts.num_tokens,
            "loss_tokens": rollouts.num_loss_tokens,
            "teacher_entropy": scores.entropy_B_T[mask_B_T].double().sum().item(),
            "teacher_maxp": scores.maxp_B_T[mask_B_T].double().sum().item()}


def evaluate_and_probe(run: Run, step: int) -> dict[str, float]:
    """`eval/*` every `train.eval_every` steps and `fidelity/*` every `train.fidelity_every` (main process; every
    process takes part in gathering what FSDP shards)."""
    cfg, out = run.cfg, {}
    evaluating = bool(cfg.train.eval_every) and (step + 1) % cfg.train.eval_every == 0
    probing = bool(cfg.train.fidelity_every) and (step + 1) % cfg.train.fidelity_every == 0
    with full_params(run.prepared, enabled=evaluating or probing), run.autocast():
        if run.main and evaluating:
            result = evaluate(run.student, run.tokenizer, run.task, cfg.eval, seed=cfg.train.seed,
                              vocab_size=run.vocab_size, progress=False)
            k = cfg.eval.k
            out[f"eval/mean@{k}"], out[f"eval/pass@{k}"] = result.mean_at_k, result.pass_at_k
            out.update({f"eval/mean@{k}_len_{b.label}": b.mean_reward for b in result.buckets
                        if b.mean_reward is not None})  # by response length (eval.length_buckets)
        if run.fidelity_probe is not None and probing:  # main process only
            out.update(run.fidelity_probe(run.student, step + 1))
    return out
