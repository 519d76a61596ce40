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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from opdlab.config import THREADS_DOC, ModelConfig, TaskConfig, _Section, save_config
from opdlab.models.loading import build_char_tokenizer, init_builtin_model, load_model
from opdlab.models.logprobs import linear_cross_entropy, softcap_of
from opdlab.models.packing import segments_hidden
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
    fused_optimizer: bool = Field(False, description=(
        "Step with PyTorch's fused AdamW kernel (`fused=True`, CPU or CUDA): one pass over each parameter instead "
        "of a chain of elementwise operators, the same update up to rounding (1-5 % faster an SFT step of "
        "SmolLM2-135M on a 2-core CPU, bench/sft_step.py). Off by default so that the built-in models stay the ones "
        "the demo was measured on."))
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")
    threads: int | None = Field(None, ge=1, description=THREADS_DOC)
    packing: bool = Field(False, description=(
        "Compute the examples without padding (`packed_sft_batch`: laid end to end, each attending to itself only "
        "with its positions restarting, so each example's loss is what it is alone) and run the output layer only "
        "where a label is, without holding (positions, vocabulary) logits: fewer positions computed, the same loss. "
        "Off: one right-padded row per example and the model's own loss."))


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


@dataclass(frozen=True)
class PackedBatch:
    """SFT examples laid end to end: `input_ids_N` and `labels_N` (-100 on the prompts) of all examples in turn,
    and each example's length. See `packed_sft_batch`."""

    input_ids_N: torch.Tensor
    labels_N: torch.Tensor
    lengths: tuple[int, ...]


def packed_sft_batch(tokenizer, task, problems, device, questions: list[str] | None = None) -> PackedBatch:
    """The examples of `sft_batch` without padding, for `sft_loss`: laid end to end, each computed as if alone
    (`opdlab.models.packing.segments_hidden`). An example's first token is a prompt token (label -100), so no
    example is trained to follow the one before it. `questions` as in `sft_rows`."""
    rows = sft_rows(tokenizer, task, problems, questions)
    ids = torch.tensor([t for x, _ in rows for t in x], dtype=torch.long)
    labels = torch.tensor([t for _, y in rows for t in y], dtype=torch.long)
    return PackedBatch(ids.to(device), labels.to(device), tuple(len(x) for x, _ in rows))


def sft_loss(model, batch: PackedBatch, chunk_size: int = 128) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens of a packed batch (labels shifted by one, as transformers'
    causal-LM loss). The decoder runs on the real tokens only, and the output layer only at the positions that
    predict a label (about half of them on worked solutions), `chunk_size` positions at a time, without ever
    holding (positions, vocabulary) logits (`opdlab.models.logprobs.linear_cross_entropy`)."""
    hidden_N_H = segments_hidden(model, batch.input_ids_N, list(batch.lengths))
    targets_N = batch.labels_N[1:]
    at_N = targets_N != -100
    head = model.get_output_embeddings()
    total = linear_cross_entropy(hidden_N_H[:-1][at_N], head, targets_N[at_N], head.weight.shape[0],
                                 softcap_of(model), chunk_size=chunk_size)
    return total / max(int(at_N.sum()), 1)


def sft_step(model, optimizer, scheduler, batch, precision: str = "fp32") -> torch.Tensor:
    """One optimizer step (gradient norm clipped to 1); returns the loss. `batch` is `packed_sft_batch`'s, whose
    loss is `sft_loss`, or `sft_batch`'s (input_ids, attention_mask, labels), whose loss is the model's own
    causal-LM loss, as the built-in models were made with. The forward runs under `precision`'s autocast, the
    backward outside it."""
    with autocast(precision, next(model.parameters()).device):
        if isinstance(batch, PackedBatch):
            loss = sft_loss(model, batch)
        else:
            ids, mask, labels = batch
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=cfg.fused_optimizer or None)
    scheduler = make_scheduler(optimizer, cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log = []
    bar = tqdm(range(cfg.steps), desc=f"sft {cfg.init or cfg.model.path}", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        problems = stream.take(cfg.batch_size)
        batch = (packed_sft_batch if cfg.packing else sft_batch)(tokenizer, task, problems, device)
        loss = sft_step(model, optimizer, scheduler, batch, precision=precision)
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
