"""Where and how a command runs: the device, the seeds, the learning-rate schedule. Shared by every command that
trains or samples (train, sft, eval, serve-teacher, the experiments)."""
from __future__ import annotations

import math
import random
import signal
import warnings

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it ('cpu', 'cuda:1', ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> int:
    """Fix torch's CPU intra-op thread count (`train.threads`); None leaves it as it is. Returns the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class threads_pinned:
    """Within `with threads_pinned(n):` torch uses `n` CPU threads (None: as it is); the count it had comes back
    on exit, so a library call pins nothing for its caller."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> int:
        return set_threads(self.threads)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `cfg.warmup_steps`, then `cfg.schedule` (constant, linear or cosine decay to
    `cfg.min_lr_ratio` of the peak) over the remaining `cfg.steps`."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        floor = cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return floor + (1.0 - floor) * max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


PRECISIONS = ("auto", "fp32", "bf16-mixed")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices markedly faster than fp32: a CUDA GPU with bf16 support, or a
    CPU with AMX or AVX512-BF16 (where a 2048² bf16 matmul measured about 5x the fp32 rate on 2 threads)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16-mixed' where bf16 is fast on `device`, else 'fp32'; the others as they are."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; allowed: {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16-mixed" if bf16_is_fast(device) else "fp32"
    if name == "bf16-mixed" and device.type == "cpu" and not bf16_is_fast(device):
        warnings.warn(
            "precision 'bf16-mixed' on a CPU without AMX or AVX512-BF16: its bf16 matmuls take a slow path (on a "
            "2-core AVX2 CPU a 2048x2048 bf16 matmul ran at 0.3 GFLOP/s against 121 in fp32). Set precision=auto "
            "(fp32 here) or fp32 unless you mean to.", stacklevel=2)
    return name


def autocast(precision: str, device: torch.device):
    """The forward passes' context: bf16 autocast under 'bf16-mixed' (weights stay as stored: fp32 master weights
    for a trained model), nothing under 'fp32'. Losses make their log-softmax in fp32 either way
    (`opdlab.models.logprobs.chunk_logits`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


# The exit status of a run stopped by SIGTERM / SIGINT after writing a checkpoint (EX_TEMPFAIL: try again later,
# i.e. `--resume`), distinct from an error (1) and a bad config (2), so a cluster script can requeue on it.
PREEMPTED_EXIT_CODE = 75


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGINT are recorded instead of killing the process, so the
    loop can finish its step, write a checkpoint and stop (`stop.requested`, `stop.name`). A second signal while the
    first is pending interrupts at once (KeyboardInterrupt), as an impatient Ctrl-C expects; checkpoints are written
    atomically, so even that loses nothing but the step. The old handlers come back on exit. Outside the main thread
    (where Python cannot install handlers) it records nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.name: str | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.name is not None

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
