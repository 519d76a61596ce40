"""Evaluate a model on a task: mean@k, pass@k, pass@1 and accuracy by response length.

`evaluate` samples `cfg.k` completions for each of the first `cfg.num_problems` problems of a split, scores each with
the task's verifier and returns an `EvalResult` holding the headline numbers, a breakdown by response length and
per-problem records. Sampling uses one `torch.Generator` seeded with `seed`, so the same model, task, config and
seed give the same result (on the same device and with the same `batch_size`: the batch layout decides which random
numbers each sequence draws).

    from opdlab.config import EvalConfig
    from opdlab.evaluate import comparison_table, evaluate
    result = evaluate(model, tokenizer, task, EvalConfig(num_problems=50, k=4))
    rich.print(result.table())
    result.save("runs/opd/eval_after.json")
    rich.print(comparison_table({"teacher": r_t, "student before": r_0, "student after": r_1}))

Definitions:
  * reward: `task.verify(problem, response)` in [0, 1] (a batch at a time, `task.verify_batch`); a sample is
    *correct* when its reward is >= 1.
  * mean@k: the mean reward over all k samples of all problems.
  * pass@k, pass@1: the mean over problems of the unbiased estimator `pass_at_k(k, correct, k or 1)`.
  * response length: completion tokens, counting the stop token when the model emitted one.
  * truncated: the sample used all `max_new_tokens` tokens without emitting a stop token.

If the split holds fewer problems than `cfg.num_problems`, all of them are evaluated, a warning says so, and the
result records both numbers (`num_problems`, `requested_problems`): small user-supplied test files stay usable.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from opdlab.config import EvalConfig, ModelConfig
from opdlab.models.loading import load_model
from opdlab.models.prompts import stop_token_ids
from opdlab.rollout.builtin import sample
from opdlab.runtime import autocast
from opdlab.tasks.base import Task
from opdlab.types import Problem, Rollouts

# A reward at or above this counts as a correct sample for pass@k.
CORRECT_THRESHOLD = 1.0
# Per-problem records keep the texts of all k samples for this many problems (enough to eyeball, small on disk).
DEFAULT_KEEP_TEXTS = 8


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the (huge) binomial coefficients.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: need at least one sample (n >= 1), got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (cannot estimate pass@{k} from {n} samples), got k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@dataclass
class LengthBucket:
    """Samples whose response length L satisfies low < L <= high (high None: the overflow bucket L > low)."""

    label: str
    low: int
    high: int | None
    count: int = 0
    mean_reward: float | None = None  # None when the bucket is empty

    def contains(self, length: int) -> bool:
        return length > self.low and (self.high is None or length <= self.high)


@dataclass
class ProblemRecord:
    """The k samples of one problem: reward, length and truncation of each, and where kept the text of each (one
    list index per sample throughout)."""

    uid: str
    rewards: list[float]
    lengths: list[int]
    truncated: list[bool]
    texts: list[str] | None = None

    @property
    def num_correct(self) -> int:
        return sum(r >= CORRECT_THRESHOLD for r in self.rewards)


@dataclass
class EvalResult:
    """What `evaluate` measured. Rates are fractions in [0, 1]; lengths are in tokens."""

    task: str
    split: str
    seed: int
    k: int
    num_problems: int
    requested_problems: int
    temperature: float
    top_p: float
    max_new_tokens: int
    mean_at_k: float
    pass_at_k: float
    pass_at_1: float
    mean_length: float
    truncated_frac: float
    buckets: list[LengthBucket]
    records: list[ProblemRecord]
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.num_problems * self.k

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Headline numbers as flat `prefix`-keyed floats, ready for metrics.jsonl."""
        return {
            f"{prefix}mean@{self.k}": self.mean_at_k,
            f"{prefix}pass@{self.k}": self.pass_at_k,
            f"{prefix}pass@1": self.pass_at_1,
            f"{prefix}response_len": self.mean_length,
            f"{prefix}truncated": self.truncated_frac,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        data = dict(data)
        data["buckets"] = [LengthBucket(**b) for b in data["buckets"]]
        data["records"] = [ProblemRecord(**_renamed_text(r)) for r in data["records"]]
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self, title: str | None = None) -> Table:
        """The headline numbers and the accuracy-by-length breakdown as one rich Table."""
        k = self.k
        table = Table(title=title or f"{self.task} / {self.split}: {self.num_problems} problems x {k} samples",
                      show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("samples", justify="right")
        table.add_row(f"mean@{k}", _pct(self.mean_at_k), str(self.num_samples))
        table.add_row(f"pass@{k}", _pct(self.pass_at_k), "")
        table.add_row("pass@1", _pct(self.pass_at_1), "")
        table.add_row("mean length (tokens)", f"{self.mean_length:.1f}", "")
        table.add_row("truncated", _pct(self.truncated_frac), "", end_section=True)
        for key in ("answer_only", "shortcut_rate", "hindsight_rate", "step_err_first_quarter",
                    "step_err_last_quarter"):
            if key in self.extra:
                table.add_row(key.replace("_", " "), _pct(self.extra[key]), "",
                              end_section=key.endswith("last_quarter"))
        for b in self.buckets:
            table.add_row(f"mean reward, length {b.label}", _pct(b.mean_reward), str(b.count))
        return table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def comparison_table(results: dict[str, EvalResult], k: int | None = None, title: str | None = None) -> Table:
    """Several models side by side, one row each in the dict's order (e.g. teacher, student before, after).

    `k` (default: the results' own) is checked against every result: numbers at different k do not compare.
    """
    if not results:
        raise ValueError("comparison_table: no results to compare")
    ks = {r.k for r in results.values()}
    if k is None:
        if len(ks) > 1:
            raise ValueError(f"comparison_table: results were evaluated at different k {sorted(ks)}")
        k = ks.pop()
    bad = [name for name, r in results.items() if r.k != k]
    if bad:
        raise ValueError(f"comparison_table: asked for k={k} but {', '.join(bad)} evaluated at another k")
    table = Table(title=title or "evaluation", header_style="bold")
    table.add_column("model", no_wrap=True)
    for col in (f"mean@{k}", f"pass@{k}", "pass@1", "mean length", "truncated", "problems"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, _pct(r.mean_at_k), _pct(r.pass_at_k), _pct(r.pass_at_1), f"{r.mean_length:.1f}",
                      _pct(r.truncated_frac), str(r.num_problems))
    return table


def make_buckets(edges: Sequence[int]) -> list[LengthBucket]:
    """Empty buckets (0, e1], (e1, e2], ..., (e_last, inf) from increasing upper edges."""
    edges = list(edges)
    if any(e < 1 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"length_buckets must be positive and strictly increasing, got {edges}")
    buckets, low = [], 0
    for high in edges:
        buckets.append(LengthBucket(label=f"{low + 1}-{high}" if low else f"<={high}", low=low, high=high))
        low = high
    buckets.append(LengthBucket(label=f">{low}", low=low, high=None))
    return buckets


def fill_buckets(buckets: list[LengthBucket], lengths: Sequence[int], rewards: Sequence[float]) -> None:
    """Set each bucket's count and mean reward from per-sample lengths and rewards."""
    sums = [0.0] * len(buckets)
    counts = [0] * len(buckets)
    for length, reward in zip(lengths, rewards, strict=True):
        i = next(i for i, b in enumerate(buckets) if b.contains(length))
        sums[i] += reward
        counts[i] += 1
    for b, s, n in zip(buckets, sums, counts):
        b.count, b.mean_reward = n, (s / n if n else None)


def _lengths_and_truncation(rollouts: Rollouts, stops: list[int], max_new_tokens: int) -> tuple[list[int], list[bool]]:
    mask_B_T = rollouts.completion_mask_B_T.cpu()
    ids_B_T = rollouts.completion_ids_B_T.cpu()
    len_B = mask_B_T.sum(dim=1)
    last_B = ids_B_T.gather(1, (len_B - 1).clamp(min=0)[:, None]).squeeze(1)
    # A sample that emits its stop token exactly at the last allowed position finished; it is not truncated.
    trunc_B = (len_B >= max_new_tokens) & ~torch.isin(last_B, torch.tensor(stops))
    return len_B.tolist(), trunc_B.tolist()


def _select_problems(task: Task, split: str, num_problems: int) -> list[Problem]:
    pool = task.problems(split)
    available = len(pool)
    if available == 0:
        raise ValueError(f"task {task.name!r} has no {split!r} problems to evaluate")
    if available < num_problems:
        warnings.warn(f"eval: task {task.name!r} has only {available} {split!r} problems; evaluating all of them "
                      f"instead of the {num_problems} asked for", stacklevel=3)
    return [pool[i] for i in range(min(num_problems, available))]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


def evaluate(model, tokenizer, task: Task, cfg: EvalConfig, *, seed: int = 0, vocab_size: int | None = None,
             split: str = "test", progress: bool = True, keep_texts: int = DEFAULT_KEEP_TEXTS) -> EvalResult:
    """Sample `cfg.k` completions for each of the first `cfg.num_problems` problems of `split` and score them.

    The model is put in eval mode and restored afterwards; `vocab_size` drops padded logit rows (see
    `models.check_compatible`). `keep_texts`: keep every sample's text for this many problems.
    """
    start = time.perf_counter()
    buckets = make_buckets(cfg.length_buckets)  # fail on bad edges before spending time sampling
    problems = _select_problems(task, split, cfg.num_problems)
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    # The generator must live on the model's device: sample() draws its random numbers there.
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    # Sequence j is sample j % k of problem j // k; batches may cut across problems.
    flat = [(i, p) for i, p in enumerate(problems) for _ in range(cfg.k)]
    rewards = [[] for _ in problems]
    lengths = [[] for _ in problems]
    truncated = [[] for _ in problems]
    all_texts: list[str] = [""] * len(flat)  # every sample's text, for the hindsight diagnostics

    was_training = model.training
    model.eval()
    try:
        with _progress(progress) as bar:
            job = bar.add_task(f"eval {task.name} ({split})", total=len(flat))
            for lo in range(0, len(flat), cfg.batch_size):
                chunk = flat[lo:lo + cfg.batch_size]
                rollouts = sample(model, tokenizer, [p for _, p in chunk], max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                                  vocab_size=vocab_size)
                lens, truncs = _lengths_and_truncation(rollouts, stops, cfg.max_new_tokens)
                all_texts[lo:lo + len(chunk)] = rollouts.texts
                graded = task.verify_batch([p for _, p in chunk], rollouts.texts)
                for (i, p), n, t, r in zip(chunk, lens, truncs, graded, strict=True):
                    rewards[i].append(float(r))
                    lengths[i].append(int(n))
                    truncated[i].append(bool(t))
                bar.advance(job, len(chunk))
    finally:
        model.train(was_training)

    k = cfg.k  # flat index j is sample j % k of problem j // k
    records = [ProblemRecord(uid=p.uid, rewards=rewards[i], lengths=lengths[i], truncated=truncated[i],
                             texts=all_texts[i * k:(i + 1) * k] if i < keep_texts else None)
               for i, p in enumerate(problems)]
    all_rewards = [r for rec in records for r in rec.rewards]
    all_lengths = [n for rec in records for n in rec.lengths]
    fill_buckets(buckets, all_lengths, all_rewards)
    return EvalResult(
        task=task.name, split=split, seed=seed, k=cfg.k, num_problems=len(problems),
        requested_problems=cfg.num_problems, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        mean_at_k=_mean(all_rewards),
        pass_at_k=_mean([pass_at_k(cfg.k, rec.num_correct, cfg.k) for rec in records]),
        pass_at_1=_mean([pass_at_k(cfg.k, rec.num_correct, 1) for rec in records]),
        mean_length=_mean(all_lengths),
        truncated_frac=_mean([float(t) for rec in records for t in rec.truncated]),
        buckets=buckets, records=records, wall_s=time.perf_counter() - start,
        extra=task_extra(task, [p for _, p in flat], all_texts),
    )


def evaluate_model(model_cfg: ModelConfig, task: Task, cfg: EvalConfig, *, device: torch.device,
                   precision: str = "fp32", seed: int = 0, progress: bool = True) -> EvalResult:
    """Load `model_cfg` for inference (bf16 weights under bf16-mixed when its dtype is 'auto') and `evaluate` it
    under `precision`'s autocast."""
    model, tokenizer = load_model(model_cfg, device, precision=precision)
    with autocast(precision, device):
        return evaluate(model, tokenizer, task, cfg, seed=seed, progress=progress)


# the task's own behaviour metrics (`Task.rollout_diagnostics`) under the names an eval record has used
_EXTRA_NAMES = {"leak/shortcut_rate": "shortcut_rate", "leak/events_per_rollout": "shortcut_events_per_rollout",
                "leak/hindsight_rate": "hindsight_rate", "format/answer_only": "answer_only",
                "drift/step_err_first_quarter": "step_err_first_quarter",
                "drift/step_err_last_quarter": "step_err_last_quarter"}


def _renamed_text(record: dict) -> dict:
    """A record as saved before records held every sample's text ('text': the first sample's) in today's form."""
    if "text" not in record:
        return record
    record = dict(record)
    text = record.pop("text")
    return {**record, "texts": None if text is None else [text]}


def task_extra(task: Task, problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """What the task declares about every sample (e.g. shortcut rate and step error rates by quarter)."""
    return {_EXTRA_NAMES.get(k, k): v for k, v in task.rollout_diagnostics(problems, texts).items()}


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")
