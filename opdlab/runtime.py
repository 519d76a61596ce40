"""Where and how a command runs: the device, the seeds, the learning-rate schedule. Shared by every command that
trains or samples (train, sft, eval, serve-teacher, the experiments)."""
from __future__ import annotations

import math
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it ('cpu', 'cuda:1', ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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

