"""Warm start: supervised fine-tuning on a task's worked solutions.

    opdlab sft CONFIG.yaml [key=value ...]

Trains on (chat-formatted question, worked solution + EOS) with the loss on the response tokens only. The demo
uses it to make the built-in teacher and student from scratch (`init=teacher|student`); on a real model it is an
ordinary SFT step before distillation.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from opdlab.config import THREADS_DOC, ModelConfig, TaskConfig, _Section, save_config
from opdlab.models.loading import build_char_tokenizer, init_builtin_model, load_model
from opdlab.models.logprobs import chunk_logits, softcap_of
from opdlab.models.packing import block_causal_mask, first_fit
from opdlab.models.prompts import render_prompt
from opdlab.runtime import autocast, make_scheduler, resolve_device, resolve_precision, seed_everything, threads_pinned
from opdlab.tasks import make_task
from opdlab.tasks.base import ProblemStream


class SFTConfig(_Section):
    """A warm-start run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to fine-tune (ignored with init).")
    init: Literal["teacher", "student"] | None = Field(None, description=(
        "Start a built-in model from scratch with this size instead of loading `model`."))
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task whose worked solutions are the targets.")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW, linear warm-up then cosine decay).")
    warmup_steps: int = Field(20, ge=0, description="Warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description=(
        "Floor of the decay, as a fraction of the peak learning rate. A floor above 0 ends the warm start at a "
        "learning rate it has been stable at, so later fine-tuning at that rate does not knock it off a sharp "
        "minimum."))
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed of initialisation and data order.")
    output_dir: str = Field("runs/sft", description="Where the fine-tuned model is saved (save_pretrained).")
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field("auto", description=(
        "As train.precision: 'bf16-mixed' runs the forward under bf16 autocast with fp32 master weights; "
        "'auto' picks it where bf16 is fast."))
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")
    threads: int | None = Field(None, ge=1, description=THREADS_DOC)
    packing: bool = Field(False, description=(
        "Pack several examples into each row (`packed_sft_batch`: a block-diagonal causal mask, positions restarting "
        "per example, so each example's loss is what it is alone) and run the output layer only where a label is: "
        "fewer padding and prompt positions computed, the same loss. Off: one right-padded row per example and the "
        "model's own loss."))


def sft_rows(tokenizer, task, problems, questions: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) per problem: the chat-formatted question then the worked solution + EOS, with labels
    -100 on the prompt. `questions` replaces the problems' own question texts (e.g. a privileged view)."""
    rows = []
    for i, p in enumerate(problems):
        question = p.question if questions is None else questions[i]
        prompt = tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        target = tokenizer(task.target(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    return rows


def sft_batch(tokenizer, task, problems, device, questions: list[str] | None = None):
    """(input_ids, attention_mask, labels), one row per problem, right-padded, with labels = -100 on the prompt and
    on padding. `questions` as in `sft_rows`."""
    rows = sft_rows(tokenizer, task, problems, questions)
    L = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding: positions are 0.. for every row
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), mask.to(device), labels.to(device)


def packed_sft_batch(tokenizer, task, problems, device, dtype: torch.dtype = torch.float32,
                     questions: list[str] | None = None, row_len: int | None = None):
    """The examples of `sft_batch` packed several to a row: (input_ids_R_L, mask_R_1_L_L, labels_R_L,
    position_ids_R_L). Rows are `row_len` long (default and at least: the longest example's length; first-fit,
    longest first), so by default no row is longer than `sft_batch`'s, and where short examples share a row fewer
    padding tokens are computed. The 4-D additive mask (in `dtype`, the model's) lets
    each token see the earlier tokens of its own example only, and positions restart at 0 for every example, so each
    example's logits are those it has alone in a row; a padding position sees only itself. Labels at an example's
    first token are -100 (its prompt), so no example is trained to follow the one before it."""
    rows = sft_rows(tokenizer, task, problems, questions)
    L = max([len(ids) for ids, _ in rows] + [row_len or 0])
    bins = first_fit([len(ids) for ids, _ in rows], L)
    R = len(bins)
    ids = torch.full((R, L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((R, L), -100, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    segment = torch.arange(R * L, dtype=torch.long).view(R, L).neg_().sub_(1)  # padding: a segment of its own
    for r, members in enumerate(bins):
        at = 0
        for k, i in enumerate(sorted(members)):  # in stream order within the row
            x, y = rows[i]
            ids[r, at:at + len(x)], labels[r, at:at + len(y)] = torch.tensor(x), torch.tensor(y)
            pos[r, at:at + len(x)] = torch.arange(len(x))
            segment[r, at:at + len(x)] = k
            at += len(x)
    mask = block_causal_mask(segment, dtype)
    return ids.to(device), mask.to(device), labels.to(device), pos.to(device)


def sft_loss(model, ids_R_L, mask, labels_R_L, position_ids_R_L=None, chunk_size: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens (labels shifted by one, as transformers' causal-LM loss),
    with the output layer run only at the positions that predict a label: on worked solutions that is about half of
    them, and no (rows, length, vocab) logit tensor is made. `mask` is `sft_batch`'s (rows, length) padding mask or
    `packed_sft_batch`'s 4-D mask. With more than `chunk_size` such positions, each chunk of them is recomputed in
    the backward pass, so at most one chunk's logits are held."""
    out = model.get_decoder()(input_ids=ids_R_L, attention_mask=mask, position_ids=position_ids_R_L, use_cache=False)
    targets_R_L = labels_R_L[:, 1:]
    at_R_L = targets_R_L != -100
    hidden_N_H, targets_N = out.last_hidden_state[:, :-1][at_R_L], targets_R_L[at_R_L]
    head = model.get_output_embeddings()
    vocab, softcap = head.weight.shape[0], softcap_of(model)

    def chunk_loss(h_C_H, y_C):
        return F.cross_entropy(chunk_logits(h_C_H, head, vocab, softcap), y_C, reduction="sum")

    total = hidden_N_H.new_zeros((), dtype=torch.float32)
    several = len(targets_N) > chunk_size and torch.is_grad_enabled()
    for start in range(0, len(targets_N), chunk_size):
        args = (hidden_N_H[start:start + chunk_size], targets_N[start:start + chunk_size])
        total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if several else chunk_loss(*args))
    return total / max(len(targets_N), 1)


def sft_step(model, optimizer, scheduler, ids, mask, labels, precision: str = "fp32",
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step on a batch from `sft_batch` or (with its `position_ids`) `packed_sft_batch` (gradient
    norm clipped to 1); returns the loss. A packed batch's loss is `sft_loss`; an unpacked one's is the model's own
    causal-LM loss, as the built-in models were made with. The forward runs under `precision`'s autocast, the
    backward outside it."""
    with autocast(precision, ids.device):
        if position_ids is None:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = sft_loss(model, ids, mask, labels, position_ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss


def run_sft(cfg: SFTConfig, progress: bool = True, log_every: int = 25) -> Path:
    """Warm-start `cfg.model` (or a built-in size from scratch) and save it to `cfg.output_dir`."""
    with threads_pinned(cfg.threads):
        return _run_sft(cfg, progress, log_every)


def _run_sft(cfg: SFTConfig, progress: bool, log_every: int) -> Path:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    if cfg.init is not None:
        tokenizer = build_char_tokenizer()
        model = init_builtin_model(cfg.init, tokenizer, seed=cfg.seed).to(device)
    else:
        model, tokenizer = load_model(cfg.model, device, trainable=True, precision=precision)
    model.train()
    task = make_task(cfg.task)
    stream = ProblemStream(task.problems("train"), seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log = []
    bar = tqdm(range(cfg.steps), desc=f"sft {cfg.init or cfg.model.path}", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        problems = stream.take(cfg.batch_size)
        if cfg.packing:
            ids, mask, labels, pos = packed_sft_batch(tokenizer, task, problems, device, next(model.parameters()).dtype)
            loss = sft_step(model, optimizer, scheduler, ids, mask, labels, precision=precision, position_ids=pos)
        else:
            loss = sft_step(model, optimizer, scheduler, *sft_batch(tokenizer, task, problems, device),
                            precision=precision)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "sft/loss": loss.item(), "time_s": time.perf_counter() - t0})
    # write next to the destination and rename, so an interrupted warm start never leaves a half-saved model
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(cfg.model_copy(update={"precision": precision}), tmp / "sft_config.yaml")
    (tmp / "sft_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
