"""Tasks from reasoning-gym's procedural generators, scored by each generator's own scorer.

`GymTask("countdown")` wraps `reasoning_gym.create_dataset(name, size=..., seed=...)`. Item i of a generator comes from
`Random(seed + i)`, so the train split (seed) and the test split (seed + TEST_SEED_OFFSET) are separate streams as
long as each has fewer than TEST_SEED_OFFSET items. Generators with a small problem space still repeat questions
across the two; a training item whose question is a test question is redrawn from a further stream
(seed + attempt * REDRAW_SEED_STRIDE), as the built-in arithmetic task does.

Items are made on first access and cached: some generators are slow (countdown takes ~12 ms an item on one core),
so building a 2000-item split up front would take half a minute. The first training item does generate the whole
test split, to know which questions to avoid.

A problem keeps the generator's entry in `meta["entry"]`; `verify` passes the response's final answer and that entry
to the generator's `score_answer` and gives reward 1 when the score reaches `threshold`. Scorers run in the helper
process of `opdlab.tasks.files` under `verify_timeout` seconds, because some evaluate the answer with sympy (countdown
parses it with `parse_expr`) and an answer like 9**9**9**9 would otherwise stall training.

Worked solutions: of the generators in reasoning-gym 0.1.25 only gsm_symbolic carries one (`metadata['answer_cot']`,
ending in '#### <answer>'); the `solution` metadata of others (count_bits, sudoku, ...) is the answer itself in
another form, so they get `solution=None`. Generators without a single reference answer (boxnet, graph_color,
propositional_logic, rubiks_cube, rush_hour: `answer` is None) get `answer=""` and `meta['has_reference']=False`;
only their scorer can judge them.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, check_split
from opdlab.tasks.hindsight import shortcut_metrics
from opdlab.tasks.files import with_answer_line
from opdlab.tasks.verify import CheckWorkerError, final_answer, run_check, shared_worker
from opdlab.types import Problem

log = logging.getLogger(__name__)

TEST_SEED_OFFSET = 1_000_003
REDRAW_SEED_STRIDE = 2 * TEST_SEED_OFFSET
MAX_REDRAWS = 20
_SOLUTION_KEYS = ("answer_cot",)
_EXAMPLES = ("basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic", "leg_counting", "products",
             "fraction_simplification", "simple_equations", "knights_knaves", "sudoku", "word_sorting")


def available_generators() -> list[str]:
    """Names `GymTask` accepts, from reasoning-gym's registry."""
    from reasoning_gym.factory import DATASETS  # lazy: reasoning-gym loads every generator; only this task needs it

    return sorted(DATASETS)


def _check_name(name: str) -> None:
    names = available_generators()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    examples = ", ".join(e for e in _EXAMPLES if e in names)
    raise ValueError(f"unknown reasoning-gym generator {name!r}; {hint}{len(names)} are available, e.g. {examples} "
                     f"(all: opdlab.tasks.gym.available_generators())")


def _create(name: str, size: int, seed: int, config: Mapping[str, Any]):
    import reasoning_gym  # lazy, as above

    try:
        return reasoning_gym.create_dataset(name, **config, size=size, seed=seed)
    except Exception as e:
        raise ValueError(f"reasoning-gym generator {name!r} rejected its settings {dict(config)} "
                         f"({type(e).__name__}: {e})") from e


_scorers: dict[tuple[str, str], Any] = {}


def prepare_scorer(name: str, config: Mapping[str, Any]) -> None:
    """Make the scorer now (the check worker's warm-up call: reasoning-gym takes seconds to import)."""
    _scorer(name, config)


def _scorer(name: str, config: Mapping[str, Any]):
    """The dataset object whose `score_answer` scores generator `name` with `config` (made once per process)."""
    key = (name, repr(sorted(config.items())))
    if key not in _scorers:
        # Scoring needs the generator's settings, not its items: a one-item dataset is the cheapest holder.
        _scorers[key] = _create(name, 1, 0, config)
    return _scorers[key]


def score_entry(name: str, config: Mapping[str, Any], answer: str, entry: dict[str, Any]) -> float:
    """The generator's own score of `answer` to `entry` (runs in the check worker, or in-process)."""
    return float(_scorer(name, config).score_answer(answer=answer, entry=entry))


class _CachedItems(Sequence):
    """A fixed-length sequence whose items are made on first access and then kept."""

    def __init__(self, n: int, make: Callable[[int], Problem]):
        self._n, self._make, self._cache = n, make, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]


class GymTask(Task):
    """A reasoning-gym generator as a Task (see the module docstring)."""

    name = "reasoning_gym"

    def __init__(self, gym_name: str = "basic_arithmetic", *, train_size: int = 2000, test_size: int = 200,
                 seed: int = 0, threshold: float = 1.0, gym_config: Mapping[str, Any] | None = None,
                 verify_timeout: float | None = 5.0):
        _check_name(gym_name)
        for label, size in (("train_size", train_size), ("test_size", test_size)):
            if not 1 <= size < TEST_SEED_OFFSET:
                raise ValueError(f"{label} must be in [1, {TEST_SEED_OFFSET - 1}] (splits are seed ranges), got {size}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if verify_timeout is not None and verify_timeout <= 0:
            raise ValueError(f"verify_timeout must be positive or None, got {verify_timeout}")
        self.gym_name, self.seed, self.threshold, self.verify_timeout = gym_name, seed, threshold, verify_timeout
        self.config = dict(gym_config or {})
        if {"size", "seed"} & self.config.keys():
            raise ValueError("gym_config must not set 'size' or 'seed'; they come from the task's sizes and seed")
        self._train = _create(gym_name, train_size, seed, self.config)
        self._test = _create(gym_name, test_size, seed + TEST_SEED_OFFSET, self.config)
        self._redraws: dict[int, Any] = {}
        self._test_questions: frozenset[str] | None = None
        self._splits = {"train": _CachedItems(train_size, self._train_problem),
                        "test": _CachedItems(test_size, self._test_problem)}
        if verify_timeout is not None:
            shared_worker().start()

    def problems(self, split: str) -> Sequence[Problem]:
        check_split(split)
        return self._splits[split]

    def rollout_diagnostics(self, problems: Sequence[Problem], responses: Sequence[str]) -> dict[str, float]:
        """Shortcut events against the problems' worked solutions (`opdlab.tasks.hindsight`), where they have one."""
        return shortcut_metrics(list(problems), list(responses))

    def verify(self, problem: Problem, response: str) -> float:
        entry = problem.meta.get("entry")
        candidate = final_answer(response)
        if entry is None or candidate is None:
            return 0.0
        warmup = ("opdlab.tasks.gym:prepare_scorer", (self.gym_name, self.config))
        try:
            score = run_check("opdlab.tasks.gym:score_entry", (self.gym_name, self.config, candidate, entry),
                              self.verify_timeout, warmup)
        except CheckWorkerError:
            raise  # a broken set-up must not pass for a run of wrong answers
        except TimeoutError as e:
            log.warning("%s scorer gave up (%s) on %r", self.gym_name, e, candidate[:200])
            return 0.0
        except Exception:
            return 0.0
        return 1.0 if score >= self.threshold else 0.0

    def _test_problem(self, i: int) -> Problem:
        return self._problem(self._test[i], "test", i, self.seed + TEST_SEED_OFFSET)

    def _train_problem(self, i: int) -> Problem:
        if self._test_questions is None:
            self._test_questions = frozenset(p.meta["entry"]["question"] for p in self._splits["test"])
        for attempt in range(MAX_REDRAWS + 1):
            entry = (self._train if attempt == 0 else self._redraw_dataset(attempt))[i]
            if entry["question"] not in self._test_questions:
                break
        else:
            log.warning("%s train item %d repeats a test question after %d redraws; kept (the generator's problem "
                        "space is nearly covered by the test split)", self.gym_name, i, MAX_REDRAWS)
        return self._problem(entry, "train", i, self.seed + attempt * REDRAW_SEED_STRIDE)

    def _redraw_dataset(self, attempt: int):
        if attempt not in self._redraws:
            self._redraws[attempt] = _create(self.gym_name, len(self._train), self.seed + attempt * REDRAW_SEED_STRIDE,
                                             self.config)
        return self._redraws[attempt]

    def _problem(self, entry: dict[str, Any], split: str, index: int, seed: int) -> Problem:
        reference = entry.get("answer")
        answer = "" if reference is None else str(reference)
        meta: dict[str, Any] = {"gym": self.gym_name, "split": split, "index": index, "seed": seed, "entry": entry,
                                "has_reference": reference is not None}
        return Problem(uid=f"{self.gym_name}-{split}-{index}",
                       question=f"{entry['question'].rstrip()} {ANSWER_INSTRUCTION}", answer=answer,
                       solution=_solution(entry, answer), meta=meta)


def _solution(entry: dict[str, Any], answer: str) -> str | None:
    metadata = entry.get("metadata") or {}
    for key in _SOLUTION_KEYS:
        text = metadata.get(key)
        if isinstance(text, str) and text.strip() and answer:
            return with_answer_line(text, answer)
    return None
