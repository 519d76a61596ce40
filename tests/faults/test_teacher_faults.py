"""A served teacher that fails in the middle of a run: a transient failure is retried and the run ends at the
weights of an undisturbed one; one that hangs past every retry, or answers with something that is not a valid
score, stops the run with a clear error and the last checkpoint intact (and equal to the undisturbed run's).

    python -m pytest tests/faults/test_teacher_faults.py -q
"""
from __future__ import annotations

import math
import threading
import time

import pytest

from opdlab.teacher.remote import RemoteTeacherError
from opdlab.teacher.serve import RequestError, TeacherService
from opdlab.train import train
from test_remote_teacher import Served, teacher_pair  # noqa: F401 - a fixture
from test_train import assert_same_weights, make_cfg, metric_rows, weights


class Faulty:
    """The real service, answering its first `healthy` requests, then failing in one way `times` times (None: from
    then on)."""

    def __init__(self, service, healthy: int, fault: str, times: int | None = None):
        self.service, self.healthy, self.fault, self.times = service, healthy, fault, times
        self.calls = 0
        self.lock = threading.Lock()

    def complete(self, body):
        with self.lock:
            self.calls += 1
            n = self.calls - self.healthy
        if n <= 0 or (self.times is not None and n > self.times):
            return self.service.complete(body)
        if self.fault == "unavailable":
            raise RequestError(503, "overloaded", kind="ServiceUnavailableError")
        if self.fault == "hang":
            time.sleep(3.0)
            return self.service.complete(body)
        answer = self.service.complete(body)
        table = answer["choices"][0]["prompt_logprobs"]
        if self.fault == "short":  # one position fewer than was sent
            del table[-1]
        elif self.fault == "nan":
            entry = table[-1]
            for v in entry.values():
                v["logprob"] = math.nan
        elif self.fault == "no_choices":
            answer = {"object": "text_completion"}
        return answer

    def models(self):
        return self.service.models()


@pytest.fixture(scope="module")
def service(teacher_pair):  # noqa: F811
    teacher, _, tokenizer = teacher_pair
    return TeacherService(teacher, tokenizer, "teacher", max_logprobs=200, chunk_size=7)


def run_against(service, model_dirs, run_dir, steps: int, *extra):
    served = Served(service)
    try:
        train(make_cfg(model_dirs, run_dir, f"train.steps={steps}", "train.save_every=1", "train.keep_checkpoints=10",
                       f"remote_teacher.url={served.url}", "remote_teacher.retries=2",
                       "remote_teacher.backoff_s=0.05", "remote_teacher.timeout_s=1", *extra), progress=False)
    finally:
        served.close()


@pytest.fixture(scope="module")
def undisturbed(service, model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "undisturbed"
    run_against(Faulty(service, healthy=10**9, fault="none"), model_dirs, run, 5)
    return run


def test_transient_failures_are_survived_exactly(service, model_dirs, tmp_path, undisturbed):
    faulty = Faulty(service, healthy=2, fault="unavailable", times=2)  # step 3's request fails twice, then answers
    run_against(faulty, model_dirs, tmp_path / "transient", 5)
    assert faulty.calls == 5 + 2
    assert_same_weights(weights(tmp_path / "transient", 5), weights(undisturbed, 5), atol=0)


@pytest.mark.parametrize("fault, words", [
    ("hang", "did not answer after 3 attempts"),
    ("unavailable", "did not answer after 3 attempts"),
    ("short", "expected prompt_logprobs for"),
    ("nan", "log-prob of token"),
    ("no_choices", "has no choices"),
])
def test_a_teacher_that_keeps_failing_stops_the_run_with_the_last_checkpoint_intact(
        service, model_dirs, tmp_path, undisturbed, fault, words):
    run = tmp_path / fault
    t0 = time.perf_counter()
    with pytest.raises(RemoteTeacherError, match=words):
        run_against(Faulty(service, healthy=3, fault=fault), model_dirs, run, 5)
    assert time.perf_counter() - t0 < 60
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    assert_same_weights(weights(run, 3), weights(undisturbed, 3), atol=0)
