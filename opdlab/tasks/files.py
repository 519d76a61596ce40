"""Question/answer tasks read from files, with answers checked by math-verify.

`FileTask` reads rows holding a question, a reference answer and optionally a worked solution from

* JSON Lines (`.jsonl`, `.ndjson`; a `.json` file is read as JSON Lines unless it holds one JSON array of objects),
* Parquet (`.parquet`),
* a directory written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose split is chosen by name),
* `hf://NAME[:CONFIG]`: whatever `datasets.load_dataset(NAME, CONFIG, split=...)` loads, a hub id (`hf://openai/gsm8k:main`,
  from the hub or its local cache) or a local folder of data files (`hf://data/mymath`, with its configs in the
  README's YAML header as on the hub). The split is `train_split` for the training file and `test_split` for the
  test file (or for the test split of the training dataset, when it has one and no test file is given).

Every row is validated on load; a bad row raises `ValueError` naming the file and the place: `line N` (1-based, as an
editor shows it) for JSON Lines, `row N` (0-based, as `dataset[N]` indexes it) for the other formats.

Splits. With `test_path` the test split is that file, used whole. Without it, a saved `DatasetDict` that has a
'test' split supplies it; otherwise `test_size` rows of the training file, drawn at random by `seed` (so a file sorted
by topic or difficulty still gives a representative test set), are held out, and every training row whose question
is one of theirs is dropped, so no test question is ever trained on. Both splits keep the file's row order.

Checking. `verify` takes the response's last 'Answer:' line (else its last \\boxed{...}) and compares it with the
reference with math-verify, in a helper process under `verify_timeout` (`opdlab.tasks.verify`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from opdlab.tasks.base import ANSWER_INSTRUCTION, Task, check_split, extract_answer
from opdlab.tasks.hindsight import shortcut_metrics
from opdlab.tasks.verify import MATH_EQUAL, CheckWorkerError, final_answer, run_check, shared_worker
from opdlab.types import Problem

log = logging.getLogger(__name__)

SUPPORTED_KINDS = (
    ".jsonl or .ndjson (JSON Lines)",
    ".json (JSON Lines, or one JSON array of objects)",
    ".parquet",
    "a directory written by datasets' save_to_disk",
    "hf://NAME[:CONFIG] (datasets.load_dataset)",
)
HUB_PREFIX = "hf://"
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


# ---------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fields:
    """Names of the fields a row is read from; `solution=None` ignores solutions."""

    question: str = "question"
    answer: str = "answer"
    solution: str | None = "solution"


@dataclass(frozen=True)
class _Record:
    """One raw row: its 0-based index among the data rows, where it sits (for messages), and its value."""

    row: int
    where: str
    line: int | None
    value: Any


def is_hub_spec(path: str | os.PathLike) -> bool:
    """Whether `path` names a dataset for `datasets.load_dataset` (`hf://NAME[:CONFIG]`)."""
    return str(path).startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """('NAME', 'CONFIG' or None) of 'hf://NAME[:CONFIG]'."""
    name, _, config = spec.removeprefix(HUB_PREFIX).partition(":")
    if not name:
        raise ValueError(f"{spec!r}: no dataset name after {HUB_PREFIX!r}; expected hf://NAME or hf://NAME:CONFIG")
    return name, config or None


def load_problems(path: str | os.PathLike, fields: Fields = Fields(), split: str = "train") -> list[Problem]:
    """All rows of `path` as Problems; `split` picks the split of a saved `DatasetDict` or of an `hf://` dataset."""
    if is_hub_spec(path):
        label = f"{path} ({split})"
        stem, records = _read_hub_dataset(str(path), fields, split)
    else:
        path = _existing(path)
        label = str(path)
        stem, records = _read_records(path, fields, split)
    problems = [_make_problem(label, stem, rec, fields) for rec in records]
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        looks_like_id = str(path).count("/") == 1 and not p.suffix and not str(path).startswith((".", "/", "~"))
        hint = f"; for a dataset by name, write {HUB_PREFIX}{path}" if looks_like_id else ""
        raise FileNotFoundError(f"task data file not found: {p} (resolved: {p.resolve()}){hint}")
    return p


def _read_records(path: Path, fields: Fields, split: str) -> tuple[str, Iterable[_Record]]:
    """(uid stem, records) of a file or saved dataset."""
    if path.is_dir():
        return _read_saved_dataset(path, fields, split)
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES_SUFFIXES:
        return path.stem, _read_json_lines(path)
    if suffix == ".json":
        return path.stem, _read_json(path)
    if suffix == ".parquet":
        return path.stem, _read_parquet(path, fields)
    raise ValueError(f"{path}: unsupported kind of file {suffix or '(no extension)'!r}; supported: "
                     + "; ".join(SUPPORTED_KINDS))


def _read_json_lines(path: Path) -> Iterator[_Record]:
    # Decoded line by line (not via a text-mode file) so a bad byte is reported with its line number.
    row = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield _Record(row, f"line {lineno}", lineno, value)
            row += 1


def _read_json(path: Path) -> Iterable[_Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        return _read_json_lines(path)  # what `Dataset.to_json` writes
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return [_Record(i, f"row {i}", None, item) for i, item in enumerate(items)]


def _read_parquet(path: Path, fields: Fields) -> list[_Record]:
    import pyarrow.parquet as pq  # lazy: only Parquet files need it

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise ValueError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    # Reading only the needed columns keeps wide files (images, metadata) cheap.
    table = pq.read_table(path, columns=_columns(str(path), names, fields))
    return [_Record(i, f"row {i}", None, value) for i, value in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, fields: Fields, split: str) -> tuple[str, list[_Record]]:
    ds, chosen = _load_saved(path, split)
    ds = ds.select_columns(_columns(str(path), ds.column_names, fields))
    stem = path.name if chosen is None else f"{path.name}.{chosen}"
    return stem, [_Record(i, f"row {i}", None, value) for i, value in enumerate(ds.to_list())]


def _load_saved(path: Path, split: str):
    """(Dataset, name of the split taken from a DatasetDict or None)."""
    from datasets import DatasetDict, load_from_disk  # lazy: `datasets` is slow to import; only saved datasets need it

    try:
        obj = load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path}: a directory, but not a dataset written by save_to_disk ({e}); "
                         f"supported: " + "; ".join(SUPPORTED_KINDS)) from None
    if not isinstance(obj, DatasetDict):
        return obj, None
    if split in obj:
        return obj[split], split
    if len(obj) == 1:
        (only,) = obj.keys()
        return obj[only], only
    raise ValueError(f"{path}: saved DatasetDict has no {split!r} split (splits: {', '.join(obj)})")


def _read_hub_dataset(spec: str, fields: Fields, split: str) -> tuple[str, list[_Record]]:
    """(uid stem, records) of split `split` of `datasets.load_dataset(NAME, CONFIG)`."""
    from datasets import load_dataset  # lazy: `datasets` is slow to import; only hf:// datasets need it

    name, config = parse_hub_spec(spec)
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one message naming the dataset
        raise ValueError(_explain_hub_failure(spec, name, config, split, e)) from None
    ds = ds.select_columns(_columns(f"{spec} ({split})", ds.column_names, fields))
    stem = f"{Path(name).name}.{split}"
    return stem, [_Record(i, f"row {i}", None, value) for i, value in enumerate(ds.to_list())]


def _explain_hub_failure(spec: str, name: str, config: str | None, split: str, err: Exception) -> str:
    what = f"dataset {name!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    text = f"{type(err).__name__}: {err}"
    if "scripts are no longer supported" in str(err):
        return (f"could not load {spec}: {name!r} is a dataset loading script, which datasets >= 4 no longer runs. "
                f"Run the script with an older datasets where it works and save_to_disk the result, or point "
                f"hf:// at the data files instead (a folder of .jsonl / .parquet / .csv files, one per split)")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if "OfflineModeIsEnabled" in text or "Couldn't reach" in text or "ConnectionError" in text:
        return (f"could not load {what}: it is not a local folder, and the Hugging Face hub is not reachable "
                f"{'(offline mode is on)' if offline else 'from here'}. Where the hub is reachable, "
                f"`datasets.load_dataset({name!r}{', ' + repr(config) if config else ''}).save_to_disk(DIR)` and "
                f"pass task.file.train_path=DIR. Cause: {text}")
    return f"could not load {what} from {spec}: {text}"


def hub_splits(spec: str) -> list[str] | None:
    """The split names of an hf:// dataset, or None when they cannot be told."""
    from datasets import get_dataset_split_names  # lazy: `datasets` is slow to import

    try:
        return list(get_dataset_split_names(*parse_hub_spec(spec)))
    except Exception:  # noqa: BLE001 - unknown: the caller then holds rows out of the training split
        return None


def saved_splits(path: str | os.PathLike) -> list[str] | None:
    """The split names of a saved DatasetDict at `path`, or None when it is not one."""
    p = Path(path)
    if not p.is_dir():
        return None
    from datasets import DatasetDict, load_from_disk  # lazy: `datasets` is slow to import; only saved datasets need it

    try:
        obj = load_from_disk(str(p))
    except Exception:
        return None
    return list(obj) if isinstance(obj, DatasetDict) else None


def _columns(label: str, present: Sequence[str], fields: Fields) -> list[str]:
    """Columns to read; a required one absent from a columnar file is an error for every row, so say so once."""
    for name in (fields.question, fields.answer):
        if name not in present:
            raise ValueError(f"{label}: missing field {name!r} (fields present: {', '.join(present) or 'none'})")
    wanted = [fields.question, fields.answer]
    if fields.solution and fields.solution in present and fields.solution not in wanted:
        wanted.append(fields.solution)
    return wanted


# ---------------------------------------------------------------------------------------------------------------
# Rows to problems
# ---------------------------------------------------------------------------------------------------------------

def _make_problem(label: str, stem: str, rec: _Record, fields: Fields) -> Problem:
    where = f"{label} {rec.where}"
    row = rec.value
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields, got {_kind(row)}")
    for name in (fields.question, fields.answer):
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    question = row[fields.question]
    if not isinstance(question, str):
        raise ValueError(f"{where}: field {fields.question!r} must be a string, got {_kind(question)}")
    if not question.strip():
        raise ValueError(f"{where}: field {fields.question!r} is empty")
    answer = _answer_text(where, fields.answer, row[fields.answer])
    solution = _solution_text(where, fields.solution, row.get(fields.solution) if fields.solution else None, answer)
    meta: dict[str, Any] = {"source": label, "row": rec.row}
    if rec.line is not None:
        meta["line"] = rec.line
    return Problem(uid=f"{stem}-{rec.row}", question=f"{question.strip()} {ANSWER_INSTRUCTION}", answer=answer,
                   solution=solution, meta=meta)


def _answer_text(where: str, name: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"{where}: field {name!r} is null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {name!r} has unsupported type {_kind(value)}; expected a string or a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field {name!r} is {value}, not a usable answer")
        # Positional notation: math-verify reads '1e-07' as e - 7.
        return format(Decimal(repr(value)), "f")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{where}: field {name!r} is empty")
    last = text.splitlines()[-1].strip()
    if last.startswith("####") and last[4:].strip():  # a GSM8K-style worked answer: its final '#### 42' line
        return last[4:].strip()
    return text


def _solution_text(where: str, name: str | None, value: Any, answer: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string or null, got {_kind(value)}")
    return with_answer_line(value, answer) if value.strip() else None


def with_answer_line(solution: str, answer: str) -> str:
    """`solution` ending in an 'Answer: ...' line, the format the model is taught to write.

    A final GSM8K-style '#### 42' line is replaced rather than kept next to the new line; a solution whose last line
    already is an answer line is returned unchanged (apart from trailing whitespace).
    """
    lines = solution.rstrip().splitlines()
    if lines and lines[-1].lstrip().startswith("####"):
        lines = "\n".join(lines[:-1]).rstrip().splitlines()
    if lines and extract_answer(lines[-1]) is not None:
        return "\n".join(lines)
    return "\n".join(lines + [f"Answer: {answer}"])


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def hold_out(problems: Sequence[Problem], test_size: int, seed: int, label: str) -> tuple[list[Problem], list[Problem]]:
    """(train, test): `test_size` rows drawn by `seed` for test, the rest minus repeats of test questions for train."""
    n = len(problems)
    if test_size >= n:
        raise ValueError(f"{label} has {n} rows, too few to hold out test_size={test_size} for testing and keep "
                         f"some for training; lower task.test_size or give task.file.test_path")
    rng = random.Random(f"opdlab-holdout/{seed}")
    test = [problems[i] for i in sorted(rng.sample(range(n), test_size))]
    held = {p.question for p in test}
    train = [p for p in problems if p.question not in held]
    if not train:
        raise ValueError(f"{label}: every row repeats a held-out test question; nothing is left for training")
    return train, test


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------

class FileTask(Task):
    """Question/answer rows from files (see the module docstring for formats, splits and checking).

    Problems: uid `<file stem>-<row>` (0-based row), question = the question + ANSWER_INSTRUCTION, answer = the
    reference as text (numbers in positional notation), solution = the solution field ending in an 'Answer: ...'
    line (None when absent), meta = source path, row, and 1-based line for JSON Lines.
    """

    name = "file"

    def __init__(self, train_path: str | os.PathLike, test_path: str | os.PathLike | None = None, *,
                 question_field: str = "question", answer_field: str = "answer",
                 solution_field: str | None = "solution", seed: int = 0, test_size: int = 200,
                 verify_timeout: float | None = 5.0, train_split: str = "train", test_split: str = "test"):
        if verify_timeout is not None and verify_timeout <= 0:
            raise ValueError(f"verify_timeout must be positive or None, got {verify_timeout}")
        self.fields = Fields(question_field, answer_field, solution_field)
        self.seed, self.verify_timeout = seed, verify_timeout
        train = load_problems(train_path, self.fields, train_split)
        splits = hub_splits(str(train_path)) if is_hub_spec(train_path) else saved_splits(train_path)
        if test_path is not None:
            test = load_problems(test_path, self.fields, test_split)
            _warn_overlap(train_path, test_path, train, test)
        elif test_split in (splits or ()) and test_split != train_split:
            test = load_problems(train_path, self.fields, test_split)
        else:
            train, test = hold_out(train, test_size, seed, str(train_path))
        self._splits = {"train": tuple(train), "test": tuple(test)}
        if verify_timeout is not None:
            shared_worker().start()  # let it import math-verify while the caller gets on with set-up

    def problems(self, split: str) -> Sequence[Problem]:
        check_split(split)
        return self._splits[split]

    def rollout_diagnostics(self, problems: Sequence[Problem], responses: Sequence[str]) -> dict[str, float]:
        """Shortcut events against the problems' worked solutions (`opdlab.tasks.hindsight`), where they have one."""
        return shortcut_metrics(list(problems), list(responses))

    def verify(self, problem: Problem, response: str) -> float:
        candidate = final_answer(response)
        if candidate is None:
            return 0.0
        try:
            same = run_check(MATH_EQUAL, (problem.answer, candidate), self.verify_timeout,
                             warmup=(MATH_EQUAL, ("1", "1")))
        except CheckWorkerError:
            raise  # a broken set-up must not pass for a run of wrong answers
        except TimeoutError as e:
            log.warning("answer check gave up (%s) on %r", e, candidate[:200])
            return 0.0
        except Exception:
            return 0.0
        return 1.0 if same else 0.0


def _warn_overlap(train_path, test_path, train: Sequence[Problem], test: Sequence[Problem]) -> None:
    # The same file on purpose (a memorisation check) is the user's call; a partial overlap is probably a mistake.
    if Path(train_path).resolve() == Path(test_path).resolve():
        return
    shared = {p.question for p in test} & {p.question for p in train}
    if shared:
        warnings.warn(f"{len(shared)} of the {len(test)} test questions in {test_path} also occur in {train_path}",
                      stacklevel=3)
