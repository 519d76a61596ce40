"""Estimator toy study: bias and variance of the γ-interpolated OPD gradient estimator
(docs/methods.md#estimator-toy-study).

With s_t = ∇ log π_θ(y_t|c_t) and r_t = log π_θ(y_t|c_t) − log q(y_t|c_t) on a trajectory sampled from π_θ,

    ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'−t} r_t') s_t        γ = 0: token-level ĝ_tok,  γ = 1: sequence-level ĝ_seq.

ĝ_seq is an unbiased estimate of ∇ KL(π_θ ‖ q) over whole trajectories; ĝ_tok drops the future terms (biased)
but its variance grows as O(T²) rather than O(T⁴). This study measures that trade-off on a small control problem:

- Environment: 1-D position, two mirror tasks (task 0: start +2 → target −3; task 1: start −2 → target +3),
  s_{t+1} = s_t + δ_t over a fixed horizon of T = 20 steps, δ_t ~ N(μ, σ²) from a Gaussian policy.
- Policy: an MLP (3 → 60 → 60 → 2, tanh; 4,022 parameters) fed (task sign ±1, s_t / 3, t / T), giving the mean
  and a state-dependent log-std squashed into [log_std_min, log_std_max].
- Teacher: one policy shared by both tasks (conditioned on the task sign), trained with REINFORCE on the terminal
  reward −|s_T − target| with a per-task batch-mean baseline; one teacher per seed.
- Student: a fresh policy (another seed, identical across γ for a given seed, and fed the same sampling noise)
  trained toward the frozen teacher with `gamma_surrogate_loss` for each γ, with Adam and no gradient clipping.
- Measured at `checkpoints` evenly spaced points of training: gradient variance (M micro-batches of B fresh
  trajectories; see `gradient_variance`), the sequence KL(π_θ ‖ q) on student trajectories (exact per-step
  Gaussian KL summed over t) and the distance to target mean |s_T − target|.

    python -m opdlab.experiments.toy.estimators                 # full study (≈2–3 min on one CPU thread)
    python -m opdlab.experiments.toy.estimators --quick         # seconds; what the tests run
    opdlab toy estimators --seeds 3 --gammas 0 0.5 1 --out runs/toy_estimators

Writes OUT/results.json (config, every checkpoint of every run, the summary per γ), OUT/estimators.png and
prints the summary table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from tqdm.auto import tqdm

START, TARGET = 2.0, -3.0  # task 0; task 1 is its mirror image (start −2, target +3)


@dataclass(frozen=True)
class ToyConfig:
    """Every knob of the study. Defaults run in about 2–3 minutes on one CPU thread."""
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Interpolation values γ of the estimator; 0 is token-level, 1 sequence-level."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Each seed trains its own teacher and its own student initialisation (shared by all γ)."""
    horizon: int = 20
    """T, the number of actions per trajectory."""
    hidden: int = 60
    """Width of the MLP's two hidden layers (60 gives 4,022 parameters)."""
    max_mean_step: float = 0.5
    """Bound on the policy's mean action |μ| (a scaled tanh): the target, 5 away, takes at least 10 of the T steps,
    so no policy can solve a task with one jump at t = 0 and every step carries part of the behaviour."""
    log_std_min: float = -2.5
    """Lower end of the policy's log-std (σ ≥ 0.08); keeps REINFORCE from collapsing the teacher to a point."""
    log_std_max: float = 0.5
    """Upper end of the policy's log-std (σ ≤ 1.65). A fresh policy starts near the middle, σ ≈ 0.37."""
    teacher_steps: int = 300
    """REINFORCE updates of each teacher."""
    teacher_batch: int = 256
    """Trajectories per teacher update (half per task)."""
    teacher_lr: float = 3e-3
    """Adam learning rate of the teacher."""
    student_steps: int = 600
    """Distillation updates of each student."""
    batch_size: int = 64
    """B: trajectories per student update and per micro-batch of the variance measurement (half per task)."""
    micro_batches: int = 8
    """M: independent micro-batches whose gradient estimates give the variance."""
    student_lr: float = 1e-3
    """Adam learning rate of the student."""
    checkpoints: int = 13
    """Evaluation points, evenly spaced from step 0 to the last step (both included)."""
    eval_trajectories: int = 512
    """Trajectories for the KL and distance-to-target evaluation at each checkpoint."""
    tail_fraction: float = 1 / 3
    """Final numbers average the last this-fraction of checkpoints (at least one); the distance jitter is the
    standard deviation of the distance to target over the same checkpoints."""
    fail_distance: float = 1.0
    """A run failed if its final distance to target exceeds this (a fifth of the initial distance of 5)."""
    def __post_init__(self):
        checks = [
            (bool(self.gammas) and all(0.0 <= g <= 1.0 for g in self.gammas),
             f"gammas must be a non-empty list of values in [0, 1], got {self.gammas}"),
            (bool(self.seeds), "seeds must not be empty"),
            *((getattr(self, k) >= 1, f"{k} must be ≥ 1, got {getattr(self, k)}")
              for k in ("horizon", "hidden", "teacher_steps", "student_steps")),
            *((getattr(self, k) >= 2 and getattr(self, k) % 2 == 0,
               f"{k} must be even and ≥ 2 (half the trajectories per task), got {getattr(self, k)}")
              for k in ("batch_size", "teacher_batch", "eval_trajectories")),
            (self.micro_batches >= 2, f"micro_batches must be ≥ 2 to measure a variance, got {self.micro_batches}"),
            (self.checkpoints >= 2, f"checkpoints must be ≥ 2 (first and last step), got {self.checkpoints}"),
            (self.max_mean_step > 0, f"max_mean_step must be > 0, got {self.max_mean_step}"),
            (self.log_std_min < self.log_std_max, f"need log_std_min < log_std_max, got {self.log_std_min}, "
                                                  f"{self.log_std_max}"),
            (0.0 < self.tail_fraction <= 1.0, f"tail_fraction must be in (0, 1], got {self.tail_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


QUICK = dict(seeds=(0,), gammas=(0.0, 1.0), teacher_steps=40, teacher_batch=64, student_steps=20, micro_batches=4,
             checkpoints=3, eval_trajectories=64)


# ---------------------------------------------------------------------------------------------------- estimator

def discounted_future_sum(r_B_T: Tensor, gamma: float) -> Tensor:
    """R_t = Σ_{t'≥t} γ^{t'−t} r_t' along the last axis (γ = 0 gives r itself, since 0⁰ = 1)."""
    T = r_B_T.shape[-1]
    t = torch.arange(T, device=r_B_T.device)
    lag_T_T = t[None, :] - t[:, None]  # [t, t'] = t' − t
    weights_T_T = torch.where(lag_T_T >= 0, torch.tensor(gamma, dtype=r_B_T.dtype) ** lag_T_T.clamp(min=0), 0.0)
    return r_B_T @ weights_T_T.T.to(r_B_T.dtype)  # (B, T)


def gamma_surrogate_loss(student_logp_B_T: Tensor, teacher_logp_B_T: Tensor, mask_B_T: Tensor,
                         gamma: float) -> Tensor:
    """A scalar whose gradient is the batch mean of ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'−t} r_t') ∇ log π_θ(y_t|c_t).

    `student_logp_B_T` must carry the graph of log π_θ at the sampled actions; the rewards
    r_t = log π_θ − log q are detached, so only the score-function terms are differentiated. Masked-out steps
    contribute neither a reward nor a score. Descending this loss descends the sequence-level reverse KL when
    γ = 1 and the per-step reverse KL when γ = 0.
    """
    mask_B_T = mask_B_T.to(student_logp_B_T.dtype)
    r_B_T = (student_logp_B_T.detach() - teacher_logp_B_T.detach()) * mask_B_T
    returns_B_T = discounted_future_sum(r_B_T, gamma)
    return (returns_B_T * student_logp_B_T * mask_B_T).sum(-1).mean()


# --------------------------------------------------------------------------------------------- policy and env

class GaussianPolicy(nn.Module):
    """δ_t ~ N(μ(c_t), σ(c_t)²) with c_t = (task sign, s_t / 3, t / T)."""
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(),
                                 nn.Linear(cfg.hidden, 2))
        self.max_mean_step, self.log_std_min, self.log_std_max = cfg.max_mean_step, cfg.log_std_min, cfg.log_std_max

    def forward(self, obs_N_3: Tensor) -> tuple[Tensor, Tensor]:
        out_N_2 = self.net(obs_N_3)
        squash_N = torch.sigmoid(out_N_2[:, 1])
        mean_N = self.max_mean_step * torch.tanh(out_N_2[:, 0])
        return mean_N, self.log_std_min + (self.log_std_max - self.log_std_min) * squash_N

    def dist(self, sign_B: Tensor, states_B_T: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log_std), each (B, T), at every visited state in one forward pass."""
        B, T = states_B_T.shape
        time_B_T = (torch.arange(T, dtype=states_B_T.dtype) / T).expand(B, T)
        obs_B_T_3 = torch.stack([sign_B[:, None].expand(B, T), states_B_T / 3.0, time_B_T], dim=-1)
        mean_N, log_std_N = self(obs_B_T_3.reshape(B * T, 3))
        return mean_N.view(B, T), log_std_N.view(B, T)

    def log_prob(self, sign_B: Tensor, states_B_T: Tensor, actions_B_T: Tensor) -> Tensor:
        """log N(δ_t; μ, σ²) of the given actions, (B, T)."""
        mean_B_T, log_std_B_T = self.dist(sign_B, states_B_T)
        z_B_T = (actions_B_T - mean_B_T) / log_std_B_T.exp()
        return -0.5 * z_B_T**2 - log_std_B_T - 0.5 * math.log(2 * math.pi)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(N(mean_p, σ_p²) ‖ N(mean_q, σ_q²)), elementwise."""
    var_ratio = (2 * (log_std_p - log_std_q)).exp()
    return 0.5 * (var_ratio + (mean_p - mean_q) ** 2 / (2 * log_std_q).exp() - 1) - (log_std_p - log_std_q)


def task_signs(n: int) -> Tensor:
    """+1 (task 0) for the first half of a batch, −1 (task 1) for the second."""
    return torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)])


@torch.no_grad()
def rollout(policy: GaussianPolicy, n: int, horizon: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """n trajectories, half per task: (sign_B, states_B_T = s_0..s_{T−1}, actions_B_T);
    s_T = s_{T−1} + δ_{T−1}."""
    sign_B = task_signs(n).to(next(policy.parameters()).dtype)
    s_B = START * sign_B
    states, actions = [], []
    for t in range(horizon):
        obs_B_3 = torch.stack([sign_B, s_B / 3.0, torch.full_like(s_B, t / horizon)], dim=-1)
        mean_B, log_std_B = policy(obs_B_3)
        delta_B = mean_B + log_std_B.exp() * torch.randn(n, generator=gen, dtype=s_B.dtype)
        states.append(s_B)
        actions.append(delta_B)
        s_B = s_B + delta_B
    return sign_B, torch.stack(states, 1), torch.stack(actions, 1)


def distance_to_target(sign_B: Tensor, states_B_T: Tensor, actions_B_T: Tensor) -> Tensor:
    return (states_B_T[:, -1] + actions_B_T[:, -1] - TARGET * sign_B).abs()  # (B,) |s_T − target|


# ------------------------------------------------------------------------------------------------------ stages

def train_teacher(cfg: ToyConfig, seed: int, progress: bool = True) -> GaussianPolicy:
    """REINFORCE with a per-task batch-mean baseline on the terminal reward −|s_T − target|."""
    torch.manual_seed(seed)
    teacher = GaussianPolicy(cfg)
    opt = torch.optim.Adam(teacher.parameters(), lr=cfg.teacher_lr)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(cfg.teacher_steps), desc=f"teacher seed {seed}", disable=not progress, leave=False)
    for _ in bar:
        sign_B, states_B_T, actions_B_T = rollout(teacher, cfg.teacher_batch, cfg.horizon, gen)
        reward_B = -distance_to_target(sign_B, states_B_T, actions_B_T)
        half = cfg.teacher_batch // 2
        baseline_B = torch.cat([reward_B[:half].mean().expand(half), reward_B[half:].mean().expand(half)])
        advantage_B = (reward_B - baseline_B) / (reward_B.std() + 1e-6)
        logp_B_T = teacher.log_prob(sign_B, states_B_T, actions_B_T)
        loss = -(advantage_B * logp_B_T.sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(dist=f"{-reward_B.mean().item():.3f}")
    teacher.requires_grad_(False)
    return teacher


def distill_loss(student: GaussianPolicy, teacher: GaussianPolicy, batch: tuple[Tensor, Tensor, Tensor],
                 gamma: float) -> tuple[Tensor, Tensor]:
    """(surrogate loss of ĝ_γ, detached batch mean of Σ_t r_t: an unbiased estimate of the sequence
    KL(π_θ ‖ q))."""
    student_logp_B_T, teacher_logp_B_T = student.log_prob(*batch), teacher.log_prob(*batch)
    loss = gamma_surrogate_loss(student_logp_B_T, teacher_logp_B_T, torch.ones_like(student_logp_B_T), gamma)
    return loss, (student_logp_B_T - teacher_logp_B_T).detach().sum(-1).mean()


def gradient_variance(student: GaussianPolicy, teacher: GaussianPolicy, gamma: float, cfg: ToyConfig,
                      gen: torch.Generator) -> tuple[float, float]:
    """(total variance, squared norm of the mean) of the micro-batch gradient estimate.

    Each of M micro-batches of B fresh trajectories gives a flattened gradient g_m ∈ R^P (the batch mean of ĝ_γ).
    Total variance = Σ_p Var_m(g_m,p) with the unbiased (M − 1) denominator, i.e. the trace of the covariance of a
    B-trajectory gradient estimate; ‖mean_m g_m‖² is logged beside it for a signal-to-noise ratio.
    """
    params = list(student.parameters())
    grads_M_P = []
    for _ in range(cfg.micro_batches):
        batch = rollout(student, cfg.batch_size, cfg.horizon, gen)
        grads = torch.autograd.grad(distill_loss(student, teacher, batch, gamma)[0], params)
        grads_M_P.append(torch.cat([g.reshape(-1) for g in grads]))
    grads_M_P = torch.stack(grads_M_P)
    return grads_M_P.var(0, unbiased=True).sum().item(), grads_M_P.mean(0).square().sum().item()


@torch.no_grad()
def evaluate(student: GaussianPolicy, teacher: GaussianPolicy, cfg: ToyConfig, gen: torch.Generator) -> dict:
    sign_B, states_B_T, actions_B_T = rollout(student, cfg.eval_trajectories, cfg.horizon, gen)
    kl_B_T = gaussian_kl(*student.dist(sign_B, states_B_T), *teacher.dist(sign_B, states_B_T))
    return {"kl": kl_B_T.sum(-1).mean().item(),
            "distance": distance_to_target(sign_B, states_B_T, actions_B_T).mean().item()}


def train_student(cfg: ToyConfig, teacher: GaussianPolicy, gamma: float, seed: int, progress: bool = True) -> dict:
    """Distil `teacher` into a fresh student with ĝ_γ; returns the run's checkpoints and, per step, the training
    batch's KL estimate (`kl_batch`) and the count of updates skipped for a non-finite loss or gradient."""
    torch.manual_seed(10_000 + seed)
    student = GaussianPolicy(cfg)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.student_lr)
    gen = torch.Generator().manual_seed(20_000 + seed)  # the same noise stream for every γ
    measure_gen = torch.Generator().manual_seed(30_000 + seed)
    eval_steps = sorted({round(i * cfg.student_steps / (cfg.checkpoints - 1)) for i in range(cfg.checkpoints)})
    checkpoints, kl_batches, nonfinite = [], [], 0

    def checkpoint(step: int) -> None:
        var, mean_sq = gradient_variance(student, teacher, gamma, cfg, measure_gen)
        checkpoints.append({"step": step, "grad_var": var, "grad_mean_sq": mean_sq,
                            **evaluate(student, teacher, cfg, measure_gen)})

    bar = tqdm(range(cfg.student_steps), desc=f"student seed {seed} γ={gamma:g}", disable=not progress, leave=False)
    for step in bar:
        if step in eval_steps:
            checkpoint(step)
            bar.set_postfix(kl=f"{checkpoints[-1]['kl']:.3f}", var=f"{checkpoints[-1]['grad_var']:.3g}")
        loss, kl_batch = distill_loss(student, teacher, rollout(student, cfg.batch_size, cfg.horizon, gen), gamma)
        opt.zero_grad()
        loss.backward()
        if torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.parameters()):
            opt.step()
        else:  # skipped, and counted against stability
            nonfinite += 1
        kl_batches.append(kl_batch.item())
    checkpoint(cfg.student_steps)
    return {"gamma": gamma, "seed": seed, "checkpoints": checkpoints, "kl_batch": kl_batches,
            "nonfinite_steps": nonfinite}


# ----------------------------------------------------------------------------------------------------- summary

def _mean_std(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def _geo_mean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-30)) for x in xs) / len(xs))


def summarise(cfg: ToyConfig, runs: list[dict]) -> list[dict]:
    """One row per γ; every entry is (mean, std) over seeds of a per-run number:

    grad_var: geometric mean over all checkpoints of the total variance (it falls by orders of magnitude during
      training, so an arithmetic mean would only report the first checkpoint);
    rel_var: geometric mean over checkpoints of total variance / ‖ḡ‖², ḡ the mean of the M micro-batch
      gradients;
    grad_var_init: total variance at step 0, where every γ has the same student, so only the estimator differs;
    kl, distance: arithmetic mean over the tail checkpoints;
    distance_jitter: std of the distance over the tail checkpoints (stability: lower is steadier);
    failed: 1 if the final distance exceeds `fail_distance`, so its mean over seeds is the fraction of failed runs;
    nonfinite: fraction of updates skipped for a non-finite loss or gradient (divergence)."""
    rows = []
    keys = ("grad_var", "grad_var_init", "rel_var", "kl", "distance", "distance_jitter", "failed", "nonfinite")
    for gamma in cfg.gammas:
        per_run = {k: [] for k in keys}
        for run in (r for r in runs if r["gamma"] == gamma):
            cps = run["checkpoints"]
            tail = cps[-max(1, round(cfg.tail_fraction * len(cps))):]
            dists = torch.tensor([c["distance"] for c in tail], dtype=torch.float64)
            per_run["grad_var"].append(_geo_mean([c["grad_var"] for c in cps]))
            per_run["grad_var_init"].append(cps[0]["grad_var"])
            per_run["rel_var"].append(_geo_mean([c["grad_var"] / max(c["grad_mean_sq"], 1e-30) for c in cps]))
            per_run["kl"].append(sum(c["kl"] for c in tail) / len(tail))
            per_run["distance"].append(dists.mean().item())
            per_run["distance_jitter"].append(dists.std().item() if len(tail) > 1 else 0.0)
            per_run["failed"].append(float(dists.mean().item() > cfg.fail_distance))
            per_run["nonfinite"].append(run["nonfinite_steps"] / cfg.student_steps)
        rows.append({"gamma": gamma, **{k: _mean_std(v) for k, v in per_run.items()}})
    return rows


def print_table(cfg: ToyConfig, rows: list[dict], teacher_distance: list[float]) -> None:
    table = Table(title=f"OPD estimator ĝ_γ on the 1-D toy (T={cfg.horizon}, M={cfg.micro_batches} × "
                        f"B={cfg.batch_size}, {len(cfg.seeds)} seed(s), mean ± std over seeds)")
    for name in ("γ", "grad variance", "at step 0", "var / ‖ḡ‖²", "final KL(π_θ‖q)", "final |s_T−target|",
                 "jitter", "failed", "non-finite"):
        table.add_column(name, justify="right")
    for row in rows:
        pm = lambda key, fmt: f"{row[key][0]:{fmt}} ± {row[key][1]:.2g}"  # noqa: E731
        table.add_row(f"{row['gamma']:g}", pm("grad_var", ".3g"), pm("grad_var_init", ".3g"), pm("rel_var", ".3g"),
                      pm("kl", ".3f"), pm("distance", ".3f"), pm("distance_jitter", ".3f"),
                      f"{row['failed'][0]:.0%}", f"{row['nonfinite'][0]:.1%}")
    console = Console(width=None if sys.stdout.isatty() else 150)  # piped or captured: don't wrap at 80 columns
    console.print(table)
    t_mean, t_std = _mean_std(teacher_distance)
    console.print(f"teacher |s_T − target|: {t_mean:.3f} ± {t_std:.3f} | grad variance: trace of the covariance of "
                  f"a B-trajectory gradient, geometric mean over {cfg.checkpoints} checkpoints; at step 0 every γ has "
                  f"the same student | final: last {cfg.tail_fraction:.0%} of checkpoints; jitter: std of the "
                  f"distance there | failed: final distance > {cfg.fail_distance:g} | more in `summarise`'s docstring")


def plot(runs: list[dict], rows: list[dict], teacher_distance: list[float], path: Path) -> None:
    """Gradient variance against γ, and per γ the curves of variance, KL and distance (mean over seeds, with a
    min–max band)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib only when plotting
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    gammas = [r["gamma"] for r in rows]
    for key, label in (("grad_var", "geometric mean over checkpoints"), ("grad_var_init", "at step 0 (same student)")):
        axes[0, 0].errorbar(gammas, [r[key][0] for r in rows], yerr=[r[key][1] for r in rows], marker="o",
                            capsize=4, label=label)
    axes[0, 0].set(yscale="log", xlabel="γ", ylabel="trace of gradient covariance",
                   title="Gradient variance vs γ (mean ± std over seeds)")
    axes[0, 0].legend(fontsize=8)
    panels = ((axes[0, 1], "grad_var", "gradient variance"), (axes[1, 0], "kl", "KL(π_θ ‖ q) per trajectory"),
              (axes[1, 1], "distance", "|s_T − target|"))
    for i, gamma in enumerate(gammas):
        seed_runs = [r for r in runs if r["gamma"] == gamma]
        steps = [c["step"] for c in seed_runs[0]["checkpoints"]]
        for ax, key, _ in panels:
            values_S_C = torch.tensor([[c[key] for c in r["checkpoints"]] for r in seed_runs], dtype=torch.float64)
            ax.plot(steps, values_S_C.mean(0), color=f"C{i}", label=f"γ={gamma:g}")
            if len(seed_runs) > 1:
                ax.fill_between(steps, values_S_C.min(0).values, values_S_C.max(0).values, color=f"C{i}", alpha=0.15)
    axes[1, 1].axhline(sum(teacher_distance) / len(teacher_distance), color="k", ls="--", lw=1, label="teacher")
    for ax, _, ylabel in panels:
        ax.set(xlabel="student step", ylabel=ylabel, yscale="log", title=f"{ylabel} (band: min–max over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_study(cfg: ToyConfig, out: Path, progress: bool = True) -> dict:
    """Trains the teachers and every (seed, γ) student, then writes results.json and estimators.png into `out`."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs, teacher_distance = [], []
    for seed in cfg.seeds:
        teacher = train_teacher(cfg, seed, progress)
        teacher_distance.append(evaluate(teacher, teacher, cfg, torch.Generator().manual_seed(seed))["distance"])
        for gamma in tqdm(cfg.gammas, desc=f"seed {seed}: students", disable=not progress):
            runs.append(train_student(cfg, teacher, gamma, seed, progress))
    rows = summarise(cfg, runs)
    results = {"config": asdict(cfg), "teacher_distance": teacher_distance, "summary": rows, "runs": runs,
               "wall_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(runs, rows, teacher_distance, out / "estimators.png")
    print_table(cfg, rows, teacher_distance)
    print(f"wrote {out / 'results.json'} and {out / 'estimators.png'} ({results['wall_s']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdlab toy estimators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, help="number of seeds, 0..N−1 (default 3; --quick: 1)")
    p.add_argument("--steps", type=int, help="student updates per run (default 600; --quick: 20)")
    p.add_argument("--gammas", type=float, nargs="+", help="γ values (default 0 0.25 0.5 0.75 1; --quick: 0 1)")
    p.add_argument("--quick", action="store_true", help="a tiny version that finishes in seconds (for tests)")
    p.add_argument("--out", default="runs/toy_estimators", help="output directory (default runs/toy_estimators)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = dict(QUICK) if args.quick else {}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        overrides["student_steps"] = args.steps
    if args.gammas is not None:
        overrides["gammas"] = tuple(args.gammas)
    try:
        cfg = replace(ToyConfig(), **overrides)
    except ValueError as e:
        p.error(str(e))
    run_study(cfg, Path(args.out), progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
