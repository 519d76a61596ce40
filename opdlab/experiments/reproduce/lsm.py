"""`opdlab reproduce lsm`: teacher top-K local support matching (LSM, truncated reverse KL on the teacher's top-K)
trains more stably than sampled-token OPD, whose one-token signal is imbalanced.

Testbed: the built-in pair on the demo's task, or `--student/--teacher`.

Precondition (training-free): the sampled-token signal is imbalanced. On student rollouts, r_t = log pi_theta(y_t)
- log pi_T(y_t) is OPD's per-token signal; the share of sum_t r_t^2 carried by the 1 % of tokens with the largest
|r_t| (a cluster bootstrap over rollouts) is set against its null, the same share for as many Gaussian values (what
a balanced signal of the same variance gives). Present when the share's interval lies above the null. Also
reported: the fraction of sampled tokens outside the teacher's top-K and their share of sum r^2.

Claim: opd and lsm (K = `objective.support_k`, 32) from the same student, the demo config at a 3x learning rate
(3e-4, where a noisy signal can knock a run back), seeds 0..N-1, held-out mean@4 every 10 steps on 100 problems x 4.
Both objectives sample the same way (top-p 1). Stability figure per run: the largest fall of held-out mean@4 below
its best value so far (the before value included), "drawdown"; the claim's figure is opd's drawdown minus lsm's
(positive: LSM more stable). Also reported: final mean@4 and the coefficient of variation of the gradient norm.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from opdlab.config import ModelConfig
from opdlab.diagnostics.preconditions.stats import cluster_bootstrap
from opdlab.experiments.compare import _curve
from opdlab.experiments.reproduce.claims import ClaimResult, fmt_ci, t_interval
from opdlab.experiments.reproduce.common import BUILTIN_STUDENT, BUILTIN_TEACHER, compare
from opdlab.experiments.pairs import prepare_models_of
from opdlab.models.loading import check_compatible, load_model
from opdlab.rollout.builtin import sample
from opdlab.run import load_run_config
from opdlab.experiments.demo import demo_config_path
from opdlab.tasks import make_task
from opdlab.teacher.scoring import score

TOP_SHARE = 0.01  # the largest 1 % of |r_t|
LR = 3e-4


def top_share(values: np.ndarray, frac: float = TOP_SHARE) -> float | None:
    """Share of sum(v^2) carried by the ceil(frac * n) values of largest |v|."""
    sq = np.sort(np.square(values))[::-1]
    if len(sq) == 0 or sq.sum() == 0:
        return None
    return float(sq[:max(1, int(np.ceil(frac * len(sq))))].sum() / sq.sum())


def gaussian_null(n: int, draws: int = 200, seed: int = 0) -> float:
    """E[top_share] for n standard normal values."""
    rng = np.random.default_rng(seed)
    return float(np.mean([top_share(rng.standard_normal(n)) for _ in range(draws)]))


@torch.no_grad()
def signal_balance(student_path: str, teacher_path: str, num_questions: int, samples: int, max_new_tokens: int,
                   support_k: int, seed: int = 0) -> dict:
    """The precondition's figures on `num_questions` x `samples` student rollouts of the demo task."""
    base = load_run_config(demo_config_path(), [f"student.path={student_path}", f"teacher.path={teacher_path}"])
    prepare_models_of(base)
    student, tok = load_model(ModelConfig(path=student_path))
    teacher, teacher_tok = load_model(ModelConfig(path=teacher_path))
    vocab_size = check_compatible(student, tok, teacher, teacher_tok).vocab_size
    task = make_task(base.task)
    problems = [p for p in task.problems("test")[:num_questions] for _ in range(samples)]
    rollouts = sample(student, tok, problems, max_new_tokens=max_new_tokens,
                      generator=torch.Generator().manual_seed(seed), vocab_size=vocab_size)
    scores = score(teacher, rollouts, vocab_size, top_k=support_k)
    mask_B_T = rollouts.loss_mask_B_T.bool()
    r_B_T = rollouts.logp_old_B_T - scores.logp_B_T
    inside_B_T = (scores.topk_ids_B_T_K == rollouts.completion_ids_B_T[..., None]).any(-1)
    rows = [(r_B_T[b][mask_B_T[b]].double().numpy(), inside_B_T[b][mask_B_T[b]].numpy())
            for b in range(len(problems))]
    every = np.concatenate([r for r, _ in rows])
    outside = np.concatenate([~i for _, i in rows])
    share = cluster_bootstrap(rows, lambda rs: top_share(np.concatenate([r for r, _ in rs])), seed=seed)
    return {"tokens": int(len(every)), "rollouts": len(rows), "top_share": share,
            "gaussian_null": gaussian_null(len(every), seed=seed), "r_mean": float(every.mean()),
            "r_std": float(every.std()), "r_max": float(every.max()),
            "outside_fraction": float(outside.mean()),
            "outside_share_of_r2": float(np.square(every[outside]).sum() / max(np.square(every).sum(), 1e-300)),
            "support_k": support_k}


def drawdown(curve: list[float]) -> float:
    """The largest fall of a curve below its running maximum."""
    best, worst = -np.inf, 0.0
    for v in curve:
        best = max(best, v)
        worst = max(worst, best - v)
    return float(worst)


def run_stability(run: dict, before: float, run_dir: Path) -> dict:
    acc = [before, *run["mean_at_k"][1]]
    _, grad = _curve(run_dir, "train/grad_norm")
    return {"drawdown": drawdown(acc), "after": run["after"], "curve": acc,
            "grad_norm_cv": statistics.pstdev(grad) / statistics.fmean(grad) if grad else None}


def reproduce(out: Path, seeds: list[int], quick: bool = False, progress: bool = True, student: str | None = None,
              teacher: str | None = None) -> ClaimResult:
    t0 = time.perf_counter()
    balance = signal_balance(student or BUILTIN_STUDENT, teacher or BUILTIN_TEACHER,
                             num_questions=4 if quick else 64, samples=1 if quick else 2,
                             max_new_tokens=24 if quick else 96, support_k=32)
    share = balance["top_share"]
    present = share["lo"] is not None and share["lo"] > balance["gaussian_null"]
    overrides = [f"train.lr={LR}", "eval.num_problems=100", *([] if quick else ["train.eval_every=10"])]
    results = compare(["opd", "lsm"], seeds, out / "runs", student=student, teacher=teacher, quick=quick,
                      overrides=overrides)
    stab = {name: {s: run_stability(results["runs"][name][s], results["before"][s], out / "runs" / name /
                                    f"seed-{s}") for s in seeds} for name in ("opd", "lsm")}
    figure = t_interval([stab["opd"][s]["drawdown"] - stab["lsm"][s]["drawdown"] for s in seeds])
    dd = {n: t_interval([stab[n][s]["drawdown"] for s in seeds]) for n in stab}
    after = {n: t_interval([stab[n][s]["after"] for s in seeds]) for n in stab}
    cv = {n: t_interval([stab[n][s]["grad_norm_cv"] for s in seeds]) for n in stab}
    before = t_interval(list(results["before"].values()))
    return ClaimResult(
        name="lsm", claim="LSM (teacher top-K truncated reverse KL) trains more stably than sampled-token OPD",
        paper="steadier optimisation than sampled-token OPD and better downstream scores, single-task math and "
              "mixed agentic + math training (Fu et al., arXiv 2603.25562); no single stability number",
        testbed=f"built-in pair, demo task, demo config at lr {LR:g}, eval every 10 steps on 100 x 4",
        precondition=(f"OPD signal imbalanced: the top 1% of tokens carry {fmt_ci(share, '.3f')} of sum r^2 "
                      f"against {balance['gaussian_null']:.3f} for a Gaussian ({balance['tokens']} tokens); "
                      f"{balance['outside_fraction']:.1%} of sampled tokens lie outside the teacher's top-32"),
        precondition_present=present,
        figure_label="drawdown of held-out mean@4, opd minus lsm",
        figure=figure,
        figure_text=(f"{fmt_ci(figure, '+.1f', 100, ' pts')} (drawdown opd {fmt_ci(dd['opd'], '.1f', 100)}, lsm "
                     f"{fmt_ci(dd['lsm'], '.1f', 100)} pts; final mean@4 opd {fmt_ci(after['opd'], '.1f', 100, '%')},"
                     f" lsm {fmt_ci(after['lsm'], '.1f', 100, '%')}, before {fmt_ci(before, '.1f', 100, '%')}; "
                     f"grad-norm CV opd {fmt_ci(cv['opd'], '.2f')}, lsm {fmt_ci(cv['lsm'], '.2f')})"),
        command="opdlab reproduce lsm", seeds=list(seeds),
        details={"precondition": balance, "stability": stab, "drawdown": dd, "after": after, "grad_norm_cv": cv,
                 "before": before},
        wall_s=time.perf_counter() - t0)
