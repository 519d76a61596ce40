"""Teacher scores from a teacher served over HTTP: `opdlab serve-teacher MODEL` or a vLLM server, through the
request/response shape of vLLM's OpenAI-compatible completions endpoint.

    opdlab serve-teacher Qwen/Qwen3-8B --port 8000               # or: vllm serve Qwen/Qwen3-8B --max-logprobs 64
    opdlab train CONFIG.yaml remote_teacher.url=http://HOST:8000 objective.name=opd

Each rollout row becomes one token-id prompt, (teacher prompt + completion), and a batch of rows one request:

    POST /v1/completions  {"model": ..., "prompt": [[ids...], ...], "max_tokens": 1, "echo": true,
                           "prompt_logprobs": K, "temperature": 1.0}

The answer's `choices[i].prompt_logprobs[j]` maps token ids (as strings) to {"logprob", "rank", "decoded_token"}
for the teacher's distribution at position j given tokens < j: the top-K plus the token actually there. From that
the client fills `opdlab.types.TeacherScores`: the sampled token's log-prob, the top-K ids and log-probs, the
max-probability (the top-1) and, since only K log-probs arrive, a lower bound of the entropy (the top-K terms plus
the tail's mass counted as one outcome: -sum_top p log p - r log r with r = 1 - sum_top p; exact when the tail
holds at most one token). A served teacher sends no hidden states, so an objective that needs the teacher's full
distribution is refused when the run starts.

Requests go out `max_in_flight` at a time; a request that fails transiently (connection refused or reset, timeout,
HTTP 408 / 429 / 5xx) is retried after `backoff_s`, doubled each time, `retries` times; a 4xx answer is not
retried. When the teacher cannot answer, `RemoteTeacherError` says so and the step is not taken: nothing is ever
scored as zero. The trainer's last checkpoint is intact, and `opdlab train CONFIG --resume` continues from it.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from opdlab.models.logprobs import scatter_back
from opdlab.objectives import get_objective
from opdlab.types import Rollouts, TeacherScores


class RemoteTeacherError(RuntimeError):
    """The served teacher could not answer (or answered something unusable); the message says what happened."""


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read().decode("utf-8", "replace"))
        detail = body.get("error", body) if isinstance(body, dict) else body
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    except (ValueError, OSError):
        return err.reason or ""


class RemoteTeacher:
    """The client: `score(rollouts, vocab_size, top_k=...)` -> TeacherScores, like `opdlab.teacher.scoring.score`."""

    def __init__(self, url: str, *, model: str | None = None, batch_size: int = 8, max_in_flight: int = 4,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.model = model or self._first_model()

    # ------------------------------------------------------------------------------------------------ transport
    def _request(self, path: str, body: dict | None = None) -> dict:
        """GET (body None) or POST JSON, with retries of transient failures; the decoded JSON answer."""
        url = f"{self.url}{path}"
        data = None if body is None else json.dumps(body).encode()
        delay, last = self.backoff_s, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {_error_text(e)}"
                if e.code < 500 and e.code not in (408, 429):
                    raise RemoteTeacherError(f"the teacher at {url} refused the request: {last}") from None
                continue
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise RemoteTeacherError(f"the teacher at {url} answered with something that is not JSON: "
                                         f"{raw[:200]!r}") from None
        raise RemoteTeacherError(
            f"the teacher at {url} did not answer after {self.retries + 1} attempts ({self.timeout_s:g} s timeout "
            f"each); last error: {last}. No update was made from this step; the run's last checkpoint is intact: "
            f"start the teacher again and continue with `opdlab train CONFIG --resume`")

    def _first_model(self) -> str:
        listing = self._request("/v1/models")
        try:
            return listing["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise RemoteTeacherError(f"{self.url}/v1/models lists no model: {str(listing)[:200]}") from None

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, rollouts: Rollouts, vocab_size: int, *, top_k: int = 0, chunk_size: int | None = None,
              teacher_prompt_ids_B_P: torch.Tensor | None = None,
              teacher_prompt_mask_B_P: torch.Tensor | None = None, keep_hidden: bool = False) -> TeacherScores:
        """The teacher's scores of every completion token (on the student's prompts unless teacher prompts are
        given). `chunk_size` is the server's business and ignored here."""
        if keep_hidden:
            raise RemoteTeacherError("this objective needs the teacher's full distribution (hidden states and "
                                     "output layer), which a teacher served over HTTP cannot send")
        p_ids = (rollouts.prompt_ids_B_P if teacher_prompt_ids_B_P is None else teacher_prompt_ids_B_P).cpu()
        p_mask = (rollouts.prompt_mask_B_P if teacher_prompt_mask_B_P is None else teacher_prompt_mask_B_P).cpu()
        c_ids, c_mask = rollouts.completion_ids_B_T.cpu(), rollouts.completion_mask_B_T.cpu().bool()
        prompts = [p[m.bool()].tolist() for p, m in zip(p_ids, p_mask)]
        completions = [c[m].tolist() for c, m in zip(c_ids, c_mask)]
        K = max(top_k, 1)  # the top-1 gives the max-probability
        rows = list(range(len(prompts)))
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

        def ask(batch: list[int]) -> list[tuple]:
            answer = self._request("/v1/completions", {
                "model": self.model, "prompt": [prompts[b] + completions[b] for b in batch], "max_tokens": 1,
                "echo": True, "prompt_logprobs": K, "temperature": 1.0})
            return self._positions(answer, batch, prompts, completions, K)

        with ThreadPoolExecutor(max_workers=self.max_in_flight) as pool:
            per_row = [r for rows_b in pool.map(ask, batches) for r in rows_b]

        # every completion position of the batch, in the row-major order of the completion mask
        token_logp_N = torch.tensor([lp for row in per_row for lp in row[0]], dtype=torch.float64)
        top_ids_N_K = torch.tensor([ids for row in per_row for ids in row[1]], dtype=torch.long).reshape(-1, K)
        top_logp_N_K = torch.tensor([lps for row in per_row for lps in row[2]], dtype=torch.float64).reshape(-1, K)
        if top_ids_N_K.numel() and int(top_ids_N_K.max()) >= vocab_size:
            raise RemoteTeacherError(f"the teacher's top-{K} holds token id {int(top_ids_N_K.max())}, outside the "
                                     f"student's vocabulary of {vocab_size}")
        p_top_N_K = top_logp_N_K.exp()
        tail_N = (1.0 - p_top_N_K.sum(-1)).clamp(min=0.0)
        # lower bound of the entropy: the top-K terms, plus the tail's mass as a single outcome
        entropy_N = -torch.xlogy(p_top_N_K, p_top_N_K).sum(-1) - torch.xlogy(tail_N, tail_N)
        device = rollouts.completion_ids_B_T.device
        return TeacherScores(
            logp_B_T=scatter_back(token_logp_N.float(), c_mask).to(device),
            topk_ids_B_T_K=scatter_back(top_ids_N_K[:, :top_k], c_mask, 0).to(device),
            topk_logp_B_T_K=scatter_back(top_logp_N_K[:, :top_k].float(), c_mask, float("-inf")).to(device),
            entropy_B_T=scatter_back(entropy_N.float(), c_mask).to(device),
            maxp_B_T=scatter_back(p_top_N_K[:, 0].float(), c_mask).to(device))

    def _positions(self, answer: dict, batch: list[int], prompts, completions, K: int) -> list[tuple]:
        """Per row of `batch`: the completion tokens' log-probs, and per token the top-K ids and log-probs (best
        first), read from the answer's prompt_logprobs."""
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError):
            raise RemoteTeacherError(f"the teacher's answer has no choices: {str(answer)[:200]}") from None
        if len(choices) != len(batch):
            raise RemoteTeacherError(f"sent {len(batch)} prompts, the teacher answered {len(choices)} choices")
        out = []
        for b, choice in zip(batch, choices):
            table = choice.get("prompt_logprobs")
            P, seq = len(prompts[b]), prompts[b] + completions[b]
            if not isinstance(table, list) or len(table) != len(seq):
                raise RemoteTeacherError(f"row {b}: expected prompt_logprobs for {len(seq)} positions, got "
                                         f"{len(table) if isinstance(table, list) else table!r}")
            token_lps, top_ids, top_lps = [], [], []
            for j in range(P, len(seq)):
                entries = table[j]
                try:
                    lps = {int(tok): float(v["logprob"]) for tok, v in entries.items()}
                    token_logp = lps[seq[j]]
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise RemoteTeacherError(f"row {b}, position {j}: no log-prob for token {seq[j]} in the "
                                             f"teacher's answer {str(entries)[:200]}") from None
                if not math.isfinite(token_logp):
                    raise RemoteTeacherError(f"row {b}, position {j}: the teacher's log-prob of token {seq[j]} "
                                             f"is {token_logp}")
                if len(lps) < K:
                    raise RemoteTeacherError(f"row {b}, position {j}: the teacher sent {len(lps)} log-probs, asked "
                                             f"for the top {K} (is the server's --max-logprobs lower?)")
                best = sorted(lps.items(), key=lambda kv: -kv[1])[:K]
                token_lps.append(token_logp)
                top_ids.append([i for i, _ in best])
                top_lps.append([lp for _, lp in best])
            out.append((token_lps, top_ids, top_lps))
        return out


def connect_teacher(cfg) -> RemoteTeacher:
    """The served teacher of a run (`cfg.remote_teacher`), checked against what the run's objective needs."""
    request = get_objective(cfg.objective.name).teacher_request(cfg.objective)
    if request.hidden:
        raise ValueError(
            f"objective {cfg.objective.name!r} needs the teacher's full distribution (its hidden states), which a "
            f"teacher served over HTTP (remote_teacher.url) cannot send; use an objective that needs the sampled "
            f"token and top-K only (opd; lsm with a teacher-top-K support), or load the teacher here "
            f"(remote_teacher.url=null)")
    if cfg.privileged.teacher != "external":
        raise ValueError(f"privileged.teacher={cfg.privileged.teacher!r} makes the teacher from the student here; "
                         f"it cannot be combined with remote_teacher.url")
    rc = cfg.remote_teacher
    return RemoteTeacher(rc.url, model=rc.model, batch_size=rc.batch_size, max_in_flight=rc.max_in_flight,
                         timeout_s=rc.timeout_s, retries=rc.retries, backoff_s=rc.backoff_s)
