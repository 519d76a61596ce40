"""`opdlab serve-teacher MODEL`: a teacher's prompt log-probs over HTTP, in the request/response shape of vLLM's
OpenAI-compatible completions endpoint, so that `opdlab.teacher.remote` talks to this server and to `vllm serve`
alike.

    opdlab serve-teacher builtin:teacher --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": [[1, 40, 41, 42]], "max_tokens": 1, "echo": true, "prompt_logprobs": 3}'

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`. A completions request takes `prompt` (a list
of token ids, a list of such lists, a string or a list of strings), `max_tokens` 0 or 1 (this server scores
prompts; with 1 it also returns the most likely next token), `prompt_logprobs` K (vLLM's extension: per prompt
position the top-K token ids with {"logprob", "rank", "decoded_token"}, plus the token actually there; the first
position, which has no context, is null), `echo` and `logprobs` K (the OpenAI-style token-string `logprobs`
object, over the prompt when `echo` is true and the generated token), and `model` (must be the served name).
Log-probs are over the model's whole output layer at temperature 1, computed `--chunk-size` positions at a time.

A malformed request gets a 4xx answer with `{"error": {"message", "type", "code"}}` naming what was wrong, and
the server goes on serving; an unexpected failure inside a request is a 500 for that request only. Requests are
handled in threads and scored one batch at a time (the model is not thread-safe).
"""
from __future__ import annotations

import errno
import json
import socket
import threading
import time
import uuid
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.nn.functional as F

from opdlab.config import ModelConfig
from opdlab.models.loading import load_model
from opdlab.models.logprobs import chunk_logits, final_hidden, softcap_of
from opdlab.runtime import resolve_device

MAX_BODY_BYTES = 256 * 1024 * 1024


class RequestError(Exception):
    """A request the server cannot serve: its HTTP status and the message sent back."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class TeacherService:
    """The model, its tokenizer and the completions logic (no HTTP here)."""

    def __init__(self, model, tokenizer, name: str, *, max_logprobs: int = 64, chunk_size: int = 1024,
                 max_batch_tokens: int = 16384):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_logprobs, self.chunk_size, self.max_batch_tokens = max_logprobs, chunk_size, max_batch_tokens
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()
        self.decode = lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))

    # ---------------------------------------------------------------------------------------- validation
    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(400, "prompt must be a non-empty list of token ids, a list of such lists, a string "
                                    f"or a list of strings; got {type(prompt).__name__}")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        seqs = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                p = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise RequestError(400, f"prompt[{i}] must be a list of token ids (integers) or a string")
            if not p:
                raise RequestError(400, f"prompt[{i}] is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(400, f"prompt[{i}] holds token id {bad[0]}, outside this model's vocabulary "
                                        f"[0, {self.vocab_size})")
            seqs.append(p)
        return seqs

    def _check_context(self, seqs: list[list[int]], max_tokens: int) -> None:
        """A prompt longer than the model's positions is refused as vLLM refuses it (scoring it would run the
        position embedding past its table, or a rotary embedding past its trained range: finite, wrong numbers)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(s) for s in seqs)
        if limit is not None and longest + max_tokens > limit:
            raise RequestError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {longest + max_tokens} tokens ({longest} in the messages, "
                                    f"{max_tokens} in the completion). Please reduce the length of the messages "
                                    f"or completion.")

    def _count(self, body: dict, key: str) -> int | None:
        v = body.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RequestError(400, f"{key} must be a non-negative integer or null, got {v!r}")
        if v > self.max_logprobs:
            raise RequestError(400, f"{key}={v} is more than this server's --max-logprobs ({self.max_logprobs})")
        return v

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _score(self, seqs: list[list[int]], k: int):
        """Per sequence: (per position j >= 1: token log-prob, rank, top-k ids, top-k log-probs; next-token
        top-k ids and log-probs at the end), computed in row batches of at most max_batch_tokens tokens."""
        out = []
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * len(seqs[i]) > self.max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        results = {}
        lm_head, softcap = self.model.get_output_embeddings(), softcap_of(self.model)
        for rows in batches:
            L = max(len(seqs[i]) for i in rows)
            ids_B_L = torch.zeros(len(rows), L, dtype=torch.long)
            mask_B_L = torch.zeros(len(rows), L, dtype=torch.long)
            for r, i in enumerate(rows):
                ids_B_L[r, :len(seqs[i])], mask_B_L[r, :len(seqs[i])] = torch.tensor(seqs[i]), 1
            hidden_B_L_H = final_hidden(self.model, ids_B_L.to(self.device), mask_B_L.to(self.device))
            for r, i in enumerate(rows):
                n = len(seqs[i])
                targets_N = torch.tensor(seqs[i][1:] + [0], device=self.device)  # the last position has none
                parts = []
                for s in range(0, n, self.chunk_size):
                    logp_C_V = F.log_softmax(chunk_logits(hidden_B_L_H[r, s:min(n, s + self.chunk_size)], lm_head,
                                                          self.vocab_size, softcap), dim=-1)
                    tok_C = logp_C_V.gather(-1, targets_N[s:s + len(logp_C_V), None]).squeeze(-1)
                    rank_C = (logp_C_V > tok_C[:, None]).sum(-1) + 1
                    top_lp_C_K, top_ids_C_K = logp_C_V.topk(max(k, 1), dim=-1)
                    parts.append((tok_C, rank_C, top_ids_C_K, top_lp_C_K))
                tok_N, rank_N, ids_N_K, lp_N_K = (torch.cat(p).cpu() for p in zip(*parts))
                results[i] = (tok_N.tolist(), rank_N.tolist(), ids_N_K.tolist(), lp_N_K.tolist())
        for i in range(len(seqs)):
            out.append(results[i])
        return out

    def complete(self, body) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        if body.get("model") not in (None, self.name):
            raise RequestError(404, f"The model `{body['model']}` does not exist; this server serves "
                                    f"`{self.name}`", kind="NotFoundError")
        if "prompt" not in body:
            raise RequestError(400, "prompt is required")
        seqs = self._prompts(body["prompt"])
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens not in (0, 1):
            raise RequestError(400, f"max_tokens must be 0 or 1 (this server scores prompts), got {max_tokens!r}")
        self._check_context(seqs, max_tokens)
        if body.get("stream"):
            raise RequestError(400, "stream is not supported")
        if body.get("n", 1) != 1:
            raise RequestError(400, f"n must be 1, got {body.get('n')!r}")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError(400, f"echo must be true or false, got {echo!r}")
        temperature = body.get("temperature")
        if temperature not in (None, 1, 1.0):
            raise RequestError(400, f"temperature must be 1 (log-probs are the model's own), got {temperature!r}")
        prompt_k, logprobs_k = self._count(body, "prompt_logprobs"), self._count(body, "logprobs")
        if prompt_k is None and echo:  # as vLLM: echo with logprobs also asks for the prompt's
            prompt_k = logprobs_k
        with self.lock:
            scored = self._score(seqs, max(prompt_k or 0, logprobs_k or 0))
        choices = [self._choice(i, seq, s, max_tokens, echo, prompt_k, logprobs_k)
                   for i, (seq, s) in enumerate(zip(seqs, scored))]
        n_prompt = sum(len(s) for s in seqs)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": max_tokens * len(seqs),
                          "total_tokens": n_prompt + max_tokens * len(seqs)}}

    def _choice(self, index, seq, scored, max_tokens, echo, prompt_k, logprobs_k) -> dict:
        tok_lp, ranks, top_ids, top_lps = scored
        n = len(seq)
        gen = [top_ids[n - 1][0]] if max_tokens else []  # the most likely next token

        def entry(j: int, k: int) -> dict:  # position j's distribution over the token after seq[:j + 1]
            table = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": self.decode(t)}
                     for r, (t, lp) in enumerate(zip(top_ids[j][:k], top_lps[j][:k]))}
            if j + 1 < n and str(seq[j + 1]) not in table:
                table[str(seq[j + 1])] = {"logprob": tok_lp[j], "rank": ranks[j],
                                          "decoded_token": self.decode(seq[j + 1])}
            return table

        choice = {"index": index, "text": (self.tokenizer.decode(seq) if echo else "") +
                  (self.decode(gen[0]) if gen else ""), "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "prompt_logprobs": None}
        if prompt_k is not None:
            choice["prompt_logprobs"] = [None] + [entry(j, prompt_k) for j in range(n - 1)]
        if logprobs_k is not None:
            shown = (list(range(n)) if echo else []) + ([n] if gen else [])
            tokens = seq + gen
            lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            for j in shown:
                text = self.decode(tokens[j])
                lp["tokens"].append(text)
                lp["text_offset"].append(offset)
                offset += len(text)
                if j == 0:
                    lp["token_logprobs"].append(None)
                    lp["top_logprobs"].append(None)
                    continue
                prev = j - 1  # the distribution that predicted tokens[j]
                lp["token_logprobs"].append(tok_lp[prev] if j < n else top_lps[prev][0])
                lp["top_logprobs"].append({self.decode(t): v for t, v in
                                           zip(top_ids[prev][:logprobs_k], top_lps[prev][:logprobs_k])})
            choice["logprobs"] = lp
        return choice

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "opdlab",
                                            "created": int(time.time()), "root": self.name}]}


def check_port(host: str, port: int) -> None:
    """A ValueError saying why `host:port` cannot be listened on (in use, not an address of this machine, ...)."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
    try:
        probe.bind((host, port))
    except OSError as e:
        hint = "; another process listens there: pick another --port (0 = any free one)" \
            if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"serve-teacher: cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    finally:
        probe.close()


def make_server(service: TeacherService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for `service` (port 0 picks a free port: `server.server_address[1]`)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request would drown the trainer's output
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            self._send(err.status, {"error": {"message": err.message, "type": err.kind, "param": None,
                                              "code": err.status}})

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, service.models())
            else:
                self._error(RequestError(404, f"no such endpoint: GET {self.path}", kind="NotFoundError"))

        def do_POST(self):
            try:
                length = self.headers.get("Content-Length")
                if length is None:
                    raise RequestError(411, "Content-Length is required")
                if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                    raise RequestError(413, f"the request body may be at most {MAX_BODY_BYTES} bytes")
                raw = self.rfile.read(int(length))
                if self.path != "/v1/completions":
                    raise RequestError(404, f"no such endpoint: POST {self.path}", kind="NotFoundError")
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise RequestError(400, f"the request body is not valid JSON: {e}") from None
                self._send(200, service.complete(body))
            except RequestError as e:
                self._error(e)
            except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
                self._error(RequestError(500, f"{type(e).__name__}: {e}", kind="InternalServerError"))

    return ThreadingHTTPServer((host, port), Handler)


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          device: str = "auto", name: str | None = None, max_logprobs: int = 64, chunk_size: int = 1024) -> None:
    """Load the model and serve it until interrupted (the address is printed once listening)."""
    check_port(host, port)  # before minutes of model loading
    model, tokenizer = load_model(ModelConfig(path=model_path, dtype=dtype), resolve_device(device))
    service = TeacherService(model, tokenizer, name or model_path, max_logprobs=max_logprobs, chunk_size=chunk_size)
    try:
        server = make_server(service, host, port)
    except OSError as e:
        raise ValueError(f"serve-teacher: cannot listen on {host}:{port}: {e.strerror or e}") from None
    h, p = server.server_address[:2]
    print(f"serving {model_path} as '{service.name}' on http://{h}:{p} (vocabulary {service.vocab_size}, "
          f"--max-logprobs {max_logprobs})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
