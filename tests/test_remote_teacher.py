"""The teacher served over HTTP (`opdlab.teacher.serve`) and its client (`opdlab.teacher.remote`), on loopback: scores
equal the in-process teacher's; the answers have vLLM's completions shape; malformed requests get 4xx and the server
keeps serving; transient failures are retried, a dead teacher is a clear error; a run whose teacher is killed
resumes from its checkpoint once a teacher answers again.

    python -m pytest tests/test_remote_teacher.py -q
"""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time

import pytest
import torch

from opdlab.config import ModelConfig
from opdlab.models.loading import load_model
from opdlab.teacher.remote import RemoteTeacher, RemoteTeacherError, connect_teacher
from opdlab.rollout.builtin import sample
from opdlab.teacher.serve import RequestError, TeacherService, make_server
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.teacher.scoring import score
from opdlab.train import train
from test_train import init_weights, make_cfg, max_diff, metric_rows, opdlab_command, subprocess_env, weights

SERVER_START_TIMEOUT = 120
VOCAB = 100  # output rows of the tiny models of conftest.py (the character tokenizer), checked below


class Served:
    """A TeacherService on a loopback port, in a thread of this process."""

    def __init__(self, service):
        self.service = service
        self.server = make_server(service, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def teacher_pair(model_dirs):
    teacher, tokenizer = load_model(ModelConfig(path=str(model_dirs["teacher"])), "cpu")
    student, _ = load_model(ModelConfig(path=str(model_dirs["student"])), "cpu")
    return teacher, student, tokenizer


@pytest.fixture(scope="module")
def served(teacher_pair):
    teacher, _, tokenizer = teacher_pair
    assert teacher.get_output_embeddings().weight.shape[0] == VOCAB
    s = Served(TeacherService(teacher, tokenizer, "teacher", max_logprobs=200, chunk_size=7))
    yield s
    s.close()


@pytest.fixture(scope="module")
def rollouts(teacher_pair):
    _, student, tokenizer = teacher_pair
    problems = ArithmeticTask(seed=1, min_steps=1, max_steps=2).problems("train")[:5]
    return sample(student, tokenizer, problems, max_new_tokens=10, generator=torch.Generator().manual_seed(0),
                  vocab_size=len(tokenizer))


def post(url: str, body, path: str = "/v1/completions", raw: bytes | None = None) -> tuple[int, dict]:
    """POST `body` as JSON (or the bytes `raw`); (status, decoded answer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("top_k", [4, 0])
def test_remote_scores_equal_in_process_scores(served, teacher_pair, rollouts, top_k):
    teacher, _, tokenizer = teacher_pair
    V = teacher.get_output_embeddings().weight.shape[0]
    local = score(teacher, rollouts, V, top_k=top_k, chunk_size=3)
    remote = RemoteTeacher(served.url, batch_size=2, max_in_flight=2).score(rollouts, V, top_k=top_k)
    mask_B_T = rollouts.completion_mask_B_T.bool()
    assert mask_B_T.sum() > 10
    torch.testing.assert_close(remote.logp_B_T[mask_B_T], local.logp_B_T[mask_B_T], rtol=0, atol=2e-5)
    torch.testing.assert_close(remote.maxp_B_T[mask_B_T], local.maxp_B_T[mask_B_T], rtol=0, atol=2e-5)
    assert torch.equal(remote.topk_ids_B_T_K[mask_B_T], local.topk_ids_B_T_K[mask_B_T])
    torch.testing.assert_close(remote.topk_logp_B_T_K[mask_B_T], local.topk_logp_B_T_K[mask_B_T], rtol=0, atol=2e-5)
    # top-K only: the entropy is a lower bound (top-K terms + the tail as one outcome)
    assert (remote.entropy_B_T[mask_B_T] <= local.entropy_B_T[mask_B_T] + 1e-5).all()
    assert (remote.entropy_B_T[mask_B_T] > 0).all()


def test_remote_entropy_is_exact_with_the_whole_vocabulary(served, teacher_pair, rollouts):
    teacher, _, tokenizer = teacher_pair
    V = teacher.get_output_embeddings().weight.shape[0]
    assert V <= 200
    local = score(teacher, rollouts, V, top_k=V)
    remote = RemoteTeacher(served.url, batch_size=5).score(rollouts, V, top_k=V)
    mask_B_T = rollouts.completion_mask_B_T.bool()
    torch.testing.assert_close(remote.entropy_B_T[mask_B_T], local.entropy_B_T[mask_B_T], rtol=0, atol=1e-4)


def test_teacher_prompts_are_scored_like_in_process(served, teacher_pair, rollouts):
    teacher, _, tokenizer = teacher_pair
    V = teacher.get_output_embeddings().weight.shape[0]
    ids = tokenizer(["Hint: think.\n" + p.question for p in rollouts.problems], return_tensors="pt", padding=True,
                    padding_side="left")
    kw = dict(teacher_prompt_ids_B_P=ids["input_ids"], teacher_prompt_mask_B_P=ids["attention_mask"])
    local = score(teacher, rollouts, V, top_k=2, **kw)
    remote = score(RemoteTeacher(served.url), rollouts, V, top_k=2, **kw)  # dispatched through opdlab.teacher.scoring
    mask_B_T = rollouts.completion_mask_B_T.bool()
    torch.testing.assert_close(remote.logp_B_T[mask_B_T], local.logp_B_T[mask_B_T], rtol=0, atol=2e-5)
    assert (remote.logp_B_T[mask_B_T] - score(teacher, rollouts, V).logp_B_T[mask_B_T]).abs().max() > 1e-3


def test_answer_has_vllm_completions_shape(served, teacher_pair):
    teacher, _, tokenizer = teacher_pair
    seq = tokenizer("12+3=15", add_special_tokens=False)["input_ids"]
    status, answer = post(served.url, {"model": "teacher", "prompt": seq, "max_tokens": 1, "echo": True,
                                       "prompt_logprobs": 2, "logprobs": 2})
    assert status == 200 and answer["object"] == "text_completion"
    choice, = answer["choices"]
    table = choice["prompt_logprobs"]
    assert len(table) == len(seq) and table[0] is None
    logits = teacher(input_ids=torch.tensor([seq])).logits[0].float()
    logp_L_V = torch.log_softmax(logits, -1)
    for j in range(1, len(seq)):
        entry = table[j]
        assert str(seq[j]) in entry and 2 <= len(entry) <= 3
        got = entry[str(seq[j])]
        assert got["logprob"] == pytest.approx(logp_L_V[j - 1, seq[j]].item(), abs=2e-5)
        assert got["rank"] == int((logp_L_V[j - 1] > logp_L_V[j - 1, seq[j]]).sum()) + 1
        assert got["decoded_token"] == tokenizer.decode([seq[j]])
        best = max(entry.values(), key=lambda v: v["logprob"])
        assert best["rank"] == 1 and best["logprob"] == pytest.approx(logp_L_V[j - 1].max().item(), abs=2e-5)
    lp = choice["logprobs"]  # OpenAI-style, over the echoed prompt and the one generated token
    assert len(lp["tokens"]) == len(seq) + 1 and lp["token_logprobs"][0] is None
    assert choice["text"] == tokenizer.decode(seq) + tokenizer.decode([int(logp_L_V[-1].argmax())])
    assert answer["usage"] == {"prompt_tokens": len(seq), "completion_tokens": 1, "total_tokens": len(seq) + 1}


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, raw, status, words", [
    (None, b"{not json", 400, "not valid JSON"),
    ({"max_tokens": 1}, None, 400, "prompt is required"),
    ({"prompt": [1, 2]}, None, 400, "max_tokens must be 0 or 1"),  # 16 when not given, as in vLLM
    ({"prompt": []}, None, 400, "non-empty"),
    ({"prompt": [[1, 2], []]}, None, 400, "prompt[1] is empty"),
    ({"prompt": [1, 99999]}, None, 400, "outside this model's vocabulary"),
    ({"prompt": [1, "a", 2]}, None, 400, "list of token ids"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1000}, None, 400, "--max-logprobs"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": -1}, None, 400, "non-negative"),
    ({"prompt": [1, 2], "max_tokens": 7}, None, 400, "max_tokens must be 0 or 1"),
    ({"prompt": [1, 2], "model": "other"}, None, 404, "does not exist"),
    ([1, 2], None, 400, "JSON object"),
    ({"prompt": [5] * 512, "max_tokens": 1}, None, 400, "maximum context length is 512 tokens. However, you "
                                                         "requested 513 tokens"),
    ({"prompt": [[5, 6], [5] * 600], "max_tokens": 0}, None, 400, "requested 600 tokens"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served, body, raw, status, words):
    got, answer = post(served.url, body, raw=raw)
    assert got == status and words in answer["error"]["message"] and answer["error"]["code"] == status
    got, answer = post(served.url, {"prompt": [[5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 1})
    assert got == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 3


def test_unknown_endpoint_is_404(served):
    assert post(served.url, {}, path="/v1/chat")[0] == 404


# ---------------------------------------------------------------- failures


class Flaky:
    """The real service behind a server that first fails `fail` requests with HTTP 503 and that may sleep, and
    counts the requests it is handling at once."""

    def __init__(self, service, fail: int = 0, sleep: float = 0.0):
        self.service, self.fail, self.sleep = service, fail, sleep
        self.calls, self.active, self.most_active = 0, 0, 0
        self.lock = threading.Lock()

    def complete(self, body):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            failing = self.calls <= self.fail
        try:
            time.sleep(self.sleep)
            if failing:
                raise RequestError(503, "warming up", kind="ServiceUnavailableError")
            return self.service.complete(body)
        finally:
            with self.lock:
                self.active -= 1

    def models(self):
        return self.service.models()


def test_transient_failures_are_retried_with_backoff(served, teacher_pair, rollouts):
    teacher, _, _ = teacher_pair
    flaky = Flaky(served.service, fail=2)
    s = Served(flaky)
    try:
        client = RemoteTeacher(s.url, model="teacher", batch_size=5, retries=2, backoff_s=0.1)
        t0 = time.perf_counter()
        remote = client.score(rollouts, VOCAB, top_k=1)
        assert time.perf_counter() - t0 >= 0.1 + 0.2  # waited 0.1 s, then 0.2 s
    finally:
        s.close()
    assert flaky.calls == 3
    local = score(teacher, rollouts, VOCAB, top_k=1)
    mask_B_T = rollouts.completion_mask_B_T.bool()
    torch.testing.assert_close(remote.logp_B_T[mask_B_T], local.logp_B_T[mask_B_T], rtol=0, atol=2e-5)


def test_in_flight_requests_are_bounded(served, rollouts):
    flaky = Flaky(served.service, sleep=0.2)
    s = Served(flaky)
    try:
        RemoteTeacher(s.url, model="teacher", batch_size=1, max_in_flight=2).score(rollouts, VOCAB, top_k=1)
    finally:
        s.close()
    assert flaky.calls == 5 and flaky.most_active == 2


def test_a_teacher_that_cannot_answer_is_a_clear_error(served, rollouts):
    slow = Served(Flaky(served.service, sleep=2.0))
    try:
        client = RemoteTeacher(slow.url, model="teacher", timeout_s=0.3, retries=1, backoff_s=0.05)
        with pytest.raises(RemoteTeacherError, match=r"did not answer after 2 attempts \(0.3 s timeout.*--resume"):
            client.score(rollouts, VOCAB, top_k=1)
    finally:
        slow.close()
    url = slow.url  # nothing listens there any more
    with pytest.raises(RemoteTeacherError, match="did not answer.*Connection ?[Rr]efused|did not answer.*refused"):
        RemoteTeacher(url, retries=1, backoff_s=0.01)
    # a request the server rejects is not retried and says why
    with pytest.raises(RemoteTeacherError, match="refused the request: HTTP 404: The model `nope`"):
        RemoteTeacher(served.url, model="nope").score(rollouts, VOCAB, top_k=1)


def test_full_distribution_objectives_are_refused(model_dirs, tmp_path):
    cfg = make_cfg(model_dirs, tmp_path, "objective.name=reverse_kl", "remote_teacher.url=http://127.0.0.1:9")
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        connect_teacher(cfg)
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        train(cfg, progress=False)


# ---------------------------------------------------------------- a killed teacher, then resume


def start_server(model_dir, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([*opdlab_command(), "serve-teacher", str(model_dir), "--port", "0", "--device", "cpu",
                             "--served-model-name", "teacher"], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=subprocess_env(), start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    line = proc.stdout.readline()
    while "serving" not in line:
        assert proc.poll() is None and time.monotonic() < deadline, f"server did not start: {open(log_path).read()}"
        line = proc.stdout.readline()
    return proc, line.split("on ")[1].split(" ")[0]


def test_run_with_killed_teacher_fails_clearly_and_resumes(model_dirs, tmp_path):
    proc, url = start_server(model_dirs["teacher"], tmp_path / "server1.log")
    run = tmp_path / "run"
    remote = [f"remote_teacher.url={url}", "remote_teacher.retries=1", "remote_teacher.backoff_s=0.05",
              "remote_teacher.timeout_s=20", "train.save_every=1"]
    latest = run / "checkpoints" / "latest"

    def kill_after_two_checkpoints():
        while not (latest.is_file() and latest.read_text().strip() >= "step-000002"):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_two_checkpoints, daemon=True)
    killer.start()
    try:
        with pytest.raises(RemoteTeacherError,
                           match=r"did not answer after 2 attempts.*checkpoint is intact.*--resume"):
            train(make_cfg(model_dirs, run, "train.steps=1000", *remote), progress=False)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    killer.join(timeout=5)
    done = int(latest.read_text().strip().removeprefix("step-"))
    assert done >= 2
    total = done + 2

    proc2, url2 = start_server(model_dirs["teacher"], tmp_path / "server2.log")
    try:
        train(make_cfg(model_dirs, run, f"train.steps={total}", *remote[1:], f"remote_teacher.url={url2}"),
              resume=True, progress=False)
    finally:
        proc2.kill()
        proc2.wait(timeout=30)
    assert [r["step"] for r in metric_rows(run)] == list(range(1, total + 1))
    # the same run with the teacher in this process: the same weights (scores agree to float rounding)
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, f"train.steps={total}"), progress=False)
    assert max_diff(weights(run, total), weights(reference, total)) < 1e-5
    assert max_diff(weights(reference, total), init_weights(model_dirs)) > 1e-4


def test_a_prompt_past_the_context_is_refused_at_once_by_the_client(served):
    """The server's 400 is not retried: the client's error carries the server's reason, immediately."""
    import time

    from opdlab.teacher.remote import RemoteTeacher, RemoteTeacherError
    client = RemoteTeacher(served.url, retries=3, backoff_s=5.0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteTeacherError, match="refused the request: HTTP 400.*maximum context length is 512"):
        client._request("/v1/completions", {"prompt": [5] * 2000, "max_tokens": 1, "prompt_logprobs": 1})
    assert time.perf_counter() - t0 < 5.0  # no back-off: not a single retry
