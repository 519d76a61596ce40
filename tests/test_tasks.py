"""Tests of opdlab.tasks: the built-in arithmetic task, FileTask (JSONL / JSON / Parquet / saved datasets) and
GymTask (reasoning-gym), their verifiers (including from worker threads and with a hanging answer), and make_task.

Run: `python -m pytest tests/test_tasks.py -q`; about 15-20 s on a 2-core CPU, most of it imports (datasets,
reasoning-gym) and starting the answer-check helper process.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from opdlab.config import TaskConfig
from opdlab.tasks import ANSWER_INSTRUCTION, ArithmeticTask, FileTask, GymTask, Problem, make_task
from opdlab.tasks.arithmetic import compact_solution
from opdlab.tasks.verify import CheckWorkerError, run_check


def in_thread(fn, *args):
    """fn(*args) run in a fresh non-main thread (where signal-based time limits cannot work)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join(60)
    assert out, "call in thread did not finish"
    return out[0]


# ------------------------------------------------------------------------------------------------ arithmetic

def replay_question(question: str) -> int:
    """The value of 'Compute a + b - c ....' computed from the question text alone."""
    expr = re.fullmatch(r"Compute (.+?)\.", question).group(1)
    tokens = expr.split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = value + int(operand) if op == "+" else value - int(operand)
    return value


def test_arithmetic_is_deterministic_by_seed():
    a, b, c = ArithmeticTask(seed=3), ArithmeticTask(seed=3), ArithmeticTask(seed=4)
    for split in ("train", "test"):
        first = [p.question for p in a.problems(split)[:20]]
        assert first == [p.question for p in b.problems(split)[:20]]
        assert first != [p.question for p in c.problems(split)[:20]]


@pytest.mark.parametrize("max_value", [9, 19, 99])
def test_arithmetic_solution_arithmetic_is_correct(max_value):
    task = ArithmeticTask(min_steps=1, max_steps=12, seed=1, max_value=max_value)
    for p in task.problems("train")[:100]:
        first, *rewrites, last = p.solution.splitlines()
        assert last == f"Answer: {p.answer}"
        assert p.question == f"Compute {first}."
        assert int(p.answer) == replay_question(p.question)
        # each line is the previous expression with its first operation carried out
        expr = first.split()
        for line in rewrites:
            assert line.startswith("= ")
            a, op, b = int(expr[0]), expr[1], int(expr[2])
            head = a + b if op == "+" else a - b
            assert 0 <= head <= max_value
            expr = [str(head)] + expr[3:]
            assert line[2:].split() == expr
        assert expr == [p.answer] and len(rewrites) == p.meta["steps"]


def test_arithmetic_shortcut_targets():
    # a fixed share of warm-start targets is the question's first number with no working; problems and test data
    # are unchanged, and the same problem always gets the same target
    clean = ArithmeticTask(seed=0, min_steps=2, max_steps=3, max_value=19)
    noisy = make_task(TaskConfig(seed=0, arithmetic={"min_steps": 2, "max_steps": 3, "max_value": 19,
                                                     "shortcut_frac": 0.4}))
    problems = list(noisy.problems("train")[:500])
    assert [p.question for p in problems] == [p.question for p in clean.problems("train")[:500]]
    shortcuts = [p for p in problems if noisy.target(p) != p.solution]
    assert 0.33 < len(shortcuts) / len(problems) < 0.47
    for p in shortcuts:
        assert noisy.target(p) == f"Answer: {p.question.split()[1]}" == noisy.target(p)
        assert noisy.verify(p, noisy.target(p)) == float(p.question.split()[1] == p.answer)
    assert all(clean.target(p) == p.solution for p in problems)
    with pytest.raises(ValueError, match="shortcut_frac"):
        ArithmeticTask(shortcut_frac=1.5)


def test_arithmetic_shortcut_targets_words_style():
    # told as a story, the shortcut still answers the start value: the number the worked solution starts with
    words = ArithmeticTask(seed=0, min_steps=3, max_steps=8, max_value=50, style="words", shortcut_frac=0.5)
    problems = list(words.problems("train")[:200])
    shortcuts = [p for p in problems if words.target(p) != p.solution]
    assert 0.4 < len(shortcuts) / len(problems) < 0.6
    for p in shortcuts:
        start = p.solution.splitlines()[0].split(" starts with ")[1].split()[0]
        assert words.target(p) == f"Answer: {start}"


def test_arithmetic_compact_targets():
    # a share of warm-start targets writes the working lines without spaces; the first and answer lines, the
    # problems and the verdict are unchanged
    clean = ArithmeticTask(seed=0, min_steps=2, max_steps=3, max_value=19)
    compact = make_task(TaskConfig(seed=0, arithmetic={"min_steps": 2, "max_steps": 3, "max_value": 19,
                                                       "compact_frac": 0.5}))
    problems = list(compact.problems("train")[:400])
    assert [p.question for p in problems] == [p.question for p in clean.problems("train")[:400]]
    rewritten = [p for p in problems if compact.target(p) != p.solution]
    assert 0.42 < len(rewritten) / len(problems) < 0.58
    for p in rewritten:
        want = p.solution.split("\n")
        got = compact.target(p).split("\n")
        assert got[0] == want[0] and got[-1] == want[-1] == f"Answer: {p.answer}"
        assert [g for g in got[1:-1]] == ["=" + w[2:].replace(" ", "") for w in want[1:-1]]
        assert compact.verify(p, compact.target(p)) == 1.0
    assert compact_solution("3 + 4 - 2\n= 7 - 2\n= 5\nAnswer: 5") == "3 + 4 - 2\n=7-2\n=5\nAnswer: 5"
    with pytest.raises(ValueError, match="compact_frac"):
        ArithmeticTask(compact_frac=-0.1)
    with pytest.raises(ValueError, match="style"):
        ArithmeticTask(style="words", compact_frac=0.5)


def test_arithmetic_verify():
    task = ArithmeticTask(seed=0)
    p = task.problems("test")[0]
    wrong = str(int(p.answer) + 1)
    assert task.verify(p, p.solution) == 1.0
    assert task.verify(p, task.target(p)) == 1.0
    assert task.verify(p, p.solution.rsplit("Answer:", 1)[0] + f"Answer: {wrong}") == 0.0
    assert task.verify(p, p.solution.rsplit("\n", 1)[0]) == 0.0  # no answer line
    assert task.verify(p, "Answer: twelve") == 0.0


def test_arithmetic_splits_share_no_question():
    # One-step problems come from a small space, so without redrawing the splits would collide.
    task = ArithmeticTask(min_steps=1, max_steps=1, seed=0, test_size=200)
    test = {p.question for p in task.problems("test")}
    train = {p.question for p in task.problems("train")[:1000]}
    assert len(test) > 100 and not test & train


def test_arithmetic_difficulty_sets_length():
    short = ArithmeticTask(min_steps=2, max_steps=2, seed=0).problems("train")[:20]
    long = ArithmeticTask(min_steps=30, max_steps=30, seed=0).problems("train")[:20]
    assert all(p.meta["steps"] == 30 and len(p.solution.splitlines()) == 32 for p in long)
    assert min(len(p.solution) for p in long) >= 300
    assert max(len(p.solution) for p in short) < 60


# ------------------------------------------------------------------------------------------------ FileTask

MATH_ROWS = [
    {"question": "Half of one?", "answer": "1/2", "id": 0},
    {"question": "Half, in LaTeX?", "answer": "\\frac{1}{2}", "solution": "One over two.\n#### 1/2"},
    {"question": "Solve x - 3 = 0.", "answer": "$x=3$", "solution": "Add 3.\nAnswer: x = 3"},
    {"question": "A float answer?", "answer": 0.5},
    {"question": "An integer answer?", "answer": 7, "solution": "Count them: 7."},
    {"question": "A surd?", "answer": "2\\sqrt{3}", "solution": None},
]


def write_jsonl(path: Path, rows: list, blank_after_first: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def math_task(tmp_path) -> FileTask:
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"Q{i}?", "answer": str(i)} for i in range(5)])
    test = write_jsonl(tmp_path / "data.jsonl", MATH_ROWS, blank_after_first=True)
    return FileTask(train, test)


def test_file_problems_fields(math_task):
    p = math_task.problems("test")
    assert [q.uid for q in p[:2]] == ["data-0", "data-1"]
    assert p[0].question == f"Half of one? {ANSWER_INSTRUCTION}"
    assert [q.answer for q in p] == ["1/2", "\\frac{1}{2}", "$x=3$", "0.5", "7", "2\\sqrt{3}"]
    assert p[1].meta["source"].endswith("data.jsonl") and (p[1].meta["row"], p[1].meta["line"]) == (1, 3)
    assert p[0].solution is None and p[5].solution is None
    assert p[1].solution == "One over two.\nAnswer: \\frac{1}{2}"  # '#### x' replaced by the answer line
    assert p[2].solution == "Add 3.\nAnswer: x = 3"  # already ends in one: kept
    assert p[4].solution == "Count them: 7.\nAnswer: 7"
    assert math_task.target(p[4]) == p[4].solution and math_task.target(p[0]) == "Answer: 1/2"
    assert len(math_task.problems("train")) == 5


@pytest.mark.parametrize("index, response, reward", [
    (0, "so\nAnswer: 0.5", 1.0),
    (0, "Answer: \\frac{1}{2}", 1.0),
    (0, "Answer: **1/2**", 1.0),
    (0, "Answer: 0.6", 0.0),
    (1, "Answer: 0.5", 1.0),
    (1, "Answer: 1/2", 1.0),
    (2, "Answer: 3", 1.0),
    (2, "Answer: x = 3", 1.0),
    (2, "Answer: 4", 0.0),
    (3, "Answer: \\frac12", 1.0),
    (4, "the total is \\boxed{7}", 1.0),  # no Answer line: the last \boxed{} counts
    (4, "Answer: 7.0", 1.0),
    (4, "it is 7", 0.0),  # neither an Answer line nor \boxed{}
    (5, "Answer: \\sqrt{12}", 1.0),
    (5, "Answer: 2", 0.0),  # a plain-text reading of 2\sqrt{3} would keep just the 2
])
def test_file_verify_math(math_task, index, response, reward):
    assert math_task.verify(math_task.problems("test")[index], response) == reward


def test_file_verify_in_thread(math_task):
    p = math_task.problems("test")[0]
    assert in_thread(math_task.verify, p, "Answer: 0.5") == 1.0
    assert in_thread(math_task.verify, p, "Answer: 2") == 0.0
    inproc = FileTask(Path(p.meta["source"]), Path(p.meta["source"]), verify_timeout=None)
    assert in_thread(inproc.verify, p, "Answer: 0.5") == 1.0


def test_file_verify_gives_up_on_a_hanging_answer(math_task):
    task = FileTask(Path(math_task.problems("test")[0].meta["source"]), test_size=1, verify_timeout=1.0)
    p = task.problems("test")[0]
    assert task.verify(p, f"Answer: {p.answer}") == 1.0  # the worker is warm
    for _ in range(2):  # the second runs in a fresh worker: its start-up grace must not extend the limit
        start = time.monotonic()
        assert task.verify(p, "Answer: 9^{9^{9}}") == 0.0  # sympy would compute this for ever
        assert time.monotonic() - start < 10
    assert task.verify(p, f"Answer: {p.answer}") == 1.0  # a fresh worker took over


def test_broken_check_worker_raises(math_task):
    # Infrastructure failure is an error, not a reward of 0 that would look like a model that never succeeds.
    with pytest.raises(CheckWorkerError, match="failed to start"):
        run_check("opdlab.tasks.verify:math_equal", ("1", "1"), 5.0, warmup=("opdlab.tasks.verify:no_such_fn", ()))
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_check("operator:truediv", (1, 0), 5.0)
    assert run_check("operator:add", (1, 2), 5.0) == 3


def test_file_holdout_split(tmp_path):
    rows = [{"question": f"What is {i} + 0?", "answer": i} for i in range(50)] + [{"question": "What is 3 + 0?",
                                                                                     "answer": 3}] * 5
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    a, b, c = FileTask(path, test_size=10, seed=1), FileTask(path, test_size=10, seed=1), FileTask(path, test_size=10)
    test, train = a.problems("test"), a.problems("train")
    assert len(test) == 10 and [p.uid for p in test] == [p.uid for p in b.problems("test")]
    assert [p.uid for p in test] != [p.uid for p in c.problems("test")]
    assert not {p.question for p in test} & {p.question for p in train}
    assert len(train) + len(test) <= 55 and [p.meta["row"] for p in train] == sorted(p.meta["row"] for p in train)
    with pytest.raises(ValueError, match="all.jsonl has 55 rows.*test_size=55"):
        FileTask(path, test_size=55)


def test_file_json_array_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": "One half?", "final": "0.5", "worked": "1 / 2 = 0.5", "extra": [1, 2]},
            {"problem": "Seven?", "final": "7", "worked": None, "extra": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match=r"2 of the 2 test questions in .*test\.json also occur in .*train\.parquet"):
        task = FileTask(tmp_path / "train.parquet", tmp_path / "test.json", question_field="problem",
                        answer_field="final", solution_field="worked")
    train, test = task.problems("train"), task.problems("test")
    assert [p.uid for p in train] == ["train-0", "train-1"] and [p.uid for p in test] == ["test-0", "test-1"]
    assert train[0].solution == "1 / 2 = 0.5\nAnswer: 0.5" and train[1].solution is None
    assert train[0].meta == {"source": str(tmp_path / "train.parquet"), "row": 0}
    assert task.verify(train[0], "Answer: 1/2") == 1.0 and task.verify(test[1], "Answer: 8") == 0.0


def test_file_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    train = Dataset.from_list([{"question": f"Q{i}?", "answer": str(i)} for i in range(6)])
    test = Dataset.from_list([{"question": "Half?", "answer": "\\frac{1}{2}"}])
    train.save_to_disk(str(tmp_path / "plain"))
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    plain = FileTask(tmp_path / "plain", test_size=2)  # a single Dataset: test rows held out
    assert (len(plain.problems("train")), len(plain.problems("test"))) == (4, 2)
    assert plain.problems("train")[0].uid.startswith("plain-")

    both = FileTask(tmp_path / "dict")  # a DatasetDict with a test split: used as the test split
    assert len(both.problems("train")) == 6 and both.problems("test")[0].uid == "dict.test-0"
    assert both.verify(both.problems("test")[0], "Answer: 0.5") == 1.0


GOOD = {"question": "Q?", "answer": "1"}


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "Q?", "answer": ', r"line 3: invalid JSON"),
    ('["question", "answer"]', r"line 3: expected an object with fields, got an array"),
    ('{"question": "Q?", "id": 7}', r"line 3: missing field 'answer' \(fields present: question, id\)"),
    ('{"answer": "1"}', r"line 3: missing field 'question' \(fields present: answer\)"),
    ('{"question": "  ", "answer": "1"}', r"line 3: field 'question' is empty"),
    ('{"question": 12, "answer": "1"}', r"line 3: field 'question' must be a string, got an integer"),
    ('{"question": "Q?", "answer": [1, 2]}', r"line 3: field 'answer' has unsupported type an array"),
    ('{"question": "Q?", "answer": {"v": 1}}', r"line 3: field 'answer' has unsupported type an object"),
    ('{"question": "Q?", "answer": true}', r"line 3: field 'answer' has unsupported type a boolean"),
    ('{"question": "Q?", "answer": null}', r"line 3: field 'answer' is null"),
    ('{"question": "Q?", "answer": ""}', r"line 3: field 'answer' is empty"),
    ('{"question": "Q?", "answer": "1", "solution": 5}', r"line 3: field 'solution' must be a string or null"),
])
def test_file_malformed_jsonl_rows(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + message):
        FileTask(path, test_size=1)


def test_file_malformed_other_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, {"question": "Q?", "answer": None}]), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls\.parquet row 1: field 'answer' is null"):
        FileTask(tmp_path / "nulls.parquet", test_size=1)
    pq.write_table(pa.Table.from_pylist([{"question": "Q?", "label": "1"}]), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols\.parquet: missing field 'answer' \(fields present: question, label\)"):
        FileTask(tmp_path / "cols.parquet", test_size=1)
    (tmp_path / "arr.json").write_text(json.dumps([GOOD, "just text"]))
    with pytest.raises(ValueError, match=r"arr\.json row 1: expected an object with fields, got a string"):
        FileTask(tmp_path / "arr.json", test_size=1)
    (tmp_path / "bytes.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bytes\.jsonl line 2: not UTF-8"):
        FileTask(tmp_path / "bytes.jsonl", test_size=1)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no rows"):
        FileTask(tmp_path / "empty.jsonl", test_size=1)


def test_file_missing_or_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        FileTask(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\nQ?,1\n")
    unsupported = r"data\.csv: unsupported kind of file '\.csv'; supported: .*\.jsonl.*\.parquet"
    with pytest.raises(ValueError, match=unsupported):
        FileTask(tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"folder: a directory, but not a dataset written by save_to_disk"):
        FileTask(tmp_path / "folder")


# ------------------------------------------------------------------------------------------------ GymTask

@pytest.mark.parametrize("name", ["basic_arithmetic", "countdown"])
def test_gym_own_answer_verifies(name):
    task = GymTask(name, train_size=50, test_size=10, seed=5)
    for split in ("train", "test"):
        for p in task.problems(split)[:3]:
            assert p.question.endswith(ANSWER_INSTRUCTION) and p.meta["entry"]["answer"] == p.answer
            assert task.verify(p, f"Let me think.\nAnswer: {p.answer}") == 1.0
            assert task.verify(p, "Answer: 1 + 1") == 0.0
            assert task.verify(p, p.answer) == 0.0  # no Answer line
    p = task.problems("test")[0]
    assert in_thread(task.verify, p, f"Answer: {p.answer}") == 1.0


def test_gym_splits_and_determinism():
    a, b = GymTask("basic_arithmetic", train_size=300, test_size=50, seed=1), GymTask("basic_arithmetic", seed=1)
    assert len(a.problems("train")) == 300 and len(b.problems("train")) == 2000
    assert [p.question for p in a.problems("test")[:5]] != [p.question for p in a.problems("train")[:5]]
    assert [p.question for p in a.problems("train")[:20]] == [p.question for p in b.problems("train")[:20]]
    test = {p.question for p in a.problems("test")}
    assert not test & {p.question for p in a.problems("train")}
    assert a.problems("train")[-1].uid == "basic_arithmetic-train-299"


def test_gym_small_space_is_redrawn():
    # Two one-digit terms: a few hundred distinct questions, so a 100-item test split collides with training.
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = GymTask("basic_arithmetic", train_size=200, test_size=100, gym_config=config)
    test = {p.question for p in task.problems("test")}
    assert not test & {p.question for p in task.problems("train")}


def test_gym_threshold_and_solution():
    lenient = GymTask("countdown", train_size=5, test_size=2, threshold=0.05)
    p = lenient.problems("test")[0]
    assert lenient.verify(p, "Answer: 1 + 1") == 1.0  # countdown scores a wrong expression 0.05
    assert lenient.verify(p, "no answer") == 0.0
    gsm = GymTask("gsm_symbolic", train_size=5, test_size=2)
    q = gsm.problems("train")[0]
    assert q.solution.endswith(f"\nAnswer: {q.answer}") and "####" not in q.solution
    assert gsm.verify(q, q.solution) == 1.0
    assert lenient.problems("train")[0].solution is None


def test_gym_unknown_name_and_speed():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym generator 'countdwn'; did you mean countdown.*"
                                         r"e\.g\. basic_arithmetic"):
        GymTask("countdwn")
    start = time.perf_counter()
    task = GymTask("countdown", train_size=2000)
    assert len(task.problems("train")) == 2000 and time.perf_counter() - start < 1.0  # items are made on demand


# ------------------------------------------------------------------------------------------------ make_task

def test_make_task(tmp_path):
    arith = make_task(TaskConfig(seed=2, test_size=7, arithmetic={"min_steps": 3, "max_steps": 5}))
    assert isinstance(arith, ArithmeticTask) and len(arith.problems("test")) == 7
    assert all(3 <= p.meta["steps"] <= 5 for p in arith.problems("test"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"Q{i}?", "a": i} for i in range(10)])
    files = make_task(TaskConfig(name="file", test_size=3,
                                 file={"train_path": str(path), "question_field": "q", "answer_field": "a"}))
    assert isinstance(files, FileTask) and len(files.problems("test")) == 3
    gym = make_task(TaskConfig(name="reasoning_gym", test_size=4, gym={"name": "chain_sum", "train_size": 30}))
    assert isinstance(gym, GymTask) and len(gym.problems("train")) == 30
    assert isinstance(gym.problems("test")[0], Problem)
    # task.gym.config reaches the generator: the same questions as GymTask given the settings directly
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    small = make_task(TaskConfig(name="reasoning_gym", test_size=4,
                                 gym={"name": "basic_arithmetic", "train_size": 20, "config": config}))
    direct = GymTask("basic_arithmetic", train_size=20, test_size=4, gym_config=config)
    assert [p.question for p in small.problems("train")] == [p.question for p in direct.problems("train")]
    assert [p.question for p in small.problems("train")] != \
        [p.question for p in GymTask("basic_arithmetic", train_size=20, test_size=4).problems("train")]
    with pytest.raises(ValueError, match="rejected its settings"):
        make_task(TaskConfig(name="reasoning_gym", gym={"name": "basic_arithmetic", "config": {"min_termz": 2}}))


def test_words_style_tells_the_same_chain_and_checks_out():
    """The words style: the question's events, replayed independently here with a regex, give the answer; every
    'a +/- n = b' line of the worked solution is right; the chain style's problem with the same seed has the same
    start, operations and answer."""
    words = ArithmeticTask(3, 8, seed=4, test_size=20, max_value=50, style="words")
    chain = ArithmeticTask(3, 8, seed=4, test_size=20, max_value=50)
    gains = "finds|buys|is given|wins|picks up"
    for p, c in zip(words.problems("test"), chain.problems("test")):
        start = int(re.search(r"has (\d+) ", p.question).group(1))
        events = re.findall(rf"({gains}|loses|gives away|sells|drops|trades away) (\d+)", p.question.split(".")[1])
        value = start
        for verb, n in events:
            value += int(n) if re.fullmatch(gains, verb) else -int(n)
        assert str(value) == p.answer == c.answer and len(events) == p.meta["steps"]
        assert c.question == "Compute " + " ".join([str(start)] + [
            f"{'+' if re.fullmatch(gains, v) else '-'} {n}" for v, n in events]) + "."
        for a, op, n, b in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", p.solution):
            assert int(b) == (int(a) + int(n) if op == "+" else int(a) - int(n))
        assert words.verify(p, p.solution) == 1.0 and words.verify(p, "Answer: -1") == 0.0
    with pytest.raises(ValueError, match="style"):
        ArithmeticTask(style="prose")


def test_compact_frac_with_the_words_style_is_a_config_error_naming_both_keys():
    with pytest.raises(ValueError, match=r"task\.arithmetic\.compact_frac .* task\.arithmetic\.style is 'words'"):
        TaskConfig(arithmetic={"style": "words", "compact_frac": 0.5})


def test_arithmetic_answer_only_rate():
    # null: the worked solutions read 0; the shortcut targets read 1; a mix reads its share, counted here directly
    task = ArithmeticTask(seed=0, min_steps=3, max_steps=8, max_value=50, style="words", shortcut_frac=0.5)
    problems = list(task.problems("train")[:100])
    clean = [p.solution for p in problems]
    targets = [task.target(p) for p in problems]
    assert task.rollout_diagnostics(problems, clean)["format/answer_only"] == 0.0
    shortcuts = sum(t != p.solution for t, p in zip(targets, problems))
    assert 30 < shortcuts < 70
    assert task.rollout_diagnostics(problems, targets)["format/answer_only"] == shortcuts / len(problems)
    assert task.rollout_diagnostics(problems[:3], ["\n  Answer: 3", "Eva has 2.\nAnswer: 2", ""])[
        "format/answer_only"] == 1 / 3
