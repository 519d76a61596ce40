"""Atomic checkpoints that a run resumes from exactly.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding the model (`save_pretrained`, safetensors, loadable
as an ordinary Hugging Face model) and `trainer_state.pt` (optimizer, scheduler, every RNG state, the step and the
data position). It is written under a temporary name and renamed into place, and `checkpoints/latest` is replaced
atomically afterwards, so a process killed at any moment leaves either the previous checkpoint or the new one,
never a half-written one.

Under FSDP (`opdlab.distributed`) each process holds a shard of the model and of the optimizer state: `full_state`
gathers both, whole, onto the main process (every process calls it; it is a collective), which writes them in
this same format, so a checkpoint does not depend on the process count or on the sharding. The optimizer state is
keyed by parameter name (`torch.distributed.checkpoint.state_dict`); `load_optimizer_state` loads it, after
`Accelerator.prepare`, into an optimizer over plain or sharded parameters, and also reads checkpoints of earlier
versions, whose optimizer state is keyed by parameter index. The model is loaded whole before `prepare`, which
shards it.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from transformers import AutoTokenizer

from opdlab.models.lora import adapter_state, is_adapted, is_adapter_dir, load_adapter_weights, load_merged

# whole tensors (all-gathered from FSDP shards), on the CPU, on the main process only (empty dicts elsewhere)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), whole and on the CPU on the main process, {} on the others.
    `model` is the plain model whose parameters the optimizer updates (sharded in place under FSDP2). Every process
    must call it: under FSDP it all-gathers the shards. A LoRA student's model state is its adapters alone."""
    model_state = adapter_state(model) if is_adapted(model) else get_model_state_dict(model, options=FULL_STATE)
    if model_state:  # tied parameters (e.g. lm_head = embed_tokens) come back as separate gathered copies: share
        first: dict[int, str] = {}  # them again, so that `save_pretrained` leaves the tied copy out as it does
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name and name in model_state:
                model_state[name] = model_state[first[id(p)]]
    optimizer = _plain(optimizer)
    if not optimizer.state:  # no step taken yet (or all skipped): no tensors to gather, and torch's getter would
        return model_state, optimizer.state_dict()  # first initialise the state with a zero-lr step
    return model_state, get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load an optimizer state saved by `full_state` (or an index-keyed `optimizer.state_dict()` of an earlier
    version) into `optimizer`, after `Accelerator.prepare`: each process keeps its shard under FSDP."""
    optimizer = _plain(optimizer)
    if not state["state"]:  # nothing but hyperparameters, by parameter index: loads whatever the sharding
        optimizer.load_state_dict(state)
        return
    if all(isinstance(k, int) for k in state["state"]):  # index-keyed: name parameters in the optimizer's order
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, trainer_state: dict, keep: int,
                    model_state: dict | None = None) -> Path:
    """Write `model` (or, when given, `model_state`: `full_state`'s gathered state dict for it) and
    `trainer_state` as checkpoint `step`, atomically; keep the last `keep` checkpoints."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp / "model", state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        with open(tmp / "trainer_state.pt", "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        for p in (tmp / "model").iterdir():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException as e:  # a failed write (a full disk) or an interrupt: no half-written copy is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SafetensorError):  # safetensors reports a failed write (ENOSPC) as its own error type
            raise OSError(f"writing {tmp / 'model'}: {e}") from e
        raise
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / "latest", final.name)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(ckpt_root: Path) -> int:
    """Remove the temporary checkpoint directories (`.step-N.tmp-PID`) that a killed process left behind (its PID
    no longer alive); returns how many. With a real model each holds gigabytes."""
    if not ckpt_root.is_dir():
        return 0
    removed = 0
    for p in ckpt_root.glob(".step-*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


def checkpoint_bytes(model) -> int:
    """About how many bytes one checkpoint of `model` takes: the saved weights (a LoRA student's adapters alone)
    plus AdamW's two fp32 moments of each trained parameter."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trained = sum(p.numel() * 4 for p in params if p.requires_grad)
    saved = trained if is_adapted(model) else sum(p.numel() * p.element_size() for p in params)
    return saved + 2 * trained


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    done = [p for p in list_checkpoints(ckpt_root) if (p / "trainer_state.pt").is_file()]
    return done[-1] if done else None


class CheckpointMismatch(RuntimeError):
    """A readable checkpoint of another model: an error in the run's config, not a damaged file."""


def load_latest_checkpoint(ckpt_root: Path, model) -> tuple[Path, dict] | None:
    """(checkpoint, trainer state) of the newest checkpoint under `ckpt_root` that loads, its weights loaded into
    `model`; None when there is none. A damaged one (a truncated or unreadable file: a disk that filled up, a copy cut
    short) is reported and skipped for the one before it, so a resume loses the steps since then, not the run."""
    newest = latest_checkpoint(ckpt_root)
    if newest is None:
        return None
    candidates = [newest, *reversed([p for p in list_checkpoints(ckpt_root) if p.name < newest.name])]
    for ckpt in candidates:
        try:
            return ckpt, load_checkpoint(ckpt, model)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors, zip and pickle errors of a damaged file
            print(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                  f"falling back to the one before it", file=sys.stderr, flush=True)
    return None


def load_checkpoint(ckpt: Path, model) -> dict:
    """Load the model weights (a LoRA student's adapters) in place and return the trainer state."""
    if is_adapted(model):
        load_adapter_weights(model, ckpt / "model")
        return torch.load(ckpt / "trainer_state.pt", weights_only=False)
    files = sorted((ckpt / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {ckpt / 'model'}")
    weights = {}
    for f in files:
        weights.update(load_file(f, device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointMismatch(f"checkpoint {ckpt} does not match the model: missing "
                                 f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Write checkpoint `step` of a run (default: the latest) to `out` as a plain Hugging Face model directory in
    fp32, LoRA adapters merged into the base (`opdlab.models.lora.load_merged`), the tokenizer beside it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt = ckpt_root / f"step-{step:06d}" if step is not None else latest_checkpoint(ckpt_root)
    if ckpt is None or not (ckpt / "model").is_dir():
        where = f"step {step}" if step is not None else "any checkpoint"
        raise FileNotFoundError(f"export: {run_dir} holds no {where} (looked in {ckpt_root})")
    model_dir, out = ckpt / "model", Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export: {out} exists and is not empty; choose another --out")
    if is_adapter_dir(model_dir):
        load_merged(model_dir, torch.float32).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    else:
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return out
