"""Privileged self-teachers: the student's own weights as the teacher
(docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd).

    frozen_student  a copy of the initial student, never updated
    lora_base       a LoRA student's own base with its adapters disabled: the initial student, no second copy
    ema_student     a copy of the student updated after every optimizer step as T <- rate * theta + (1 - rate) * T
                    (`privileged.ema_rate`, default 0.01): parameters with requires_grad False, updated in place
                    under no_grad, so it holds no gradients and no optimizer state, one extra copy of the weights

The teacher's context (which view of the oracle trace it reads) is `opdlab.teacher.views`.
"""
from __future__ import annotations

import copy

import torch

from opdlab.config import PrivilegedConfig
from opdlab.models.lora import AdaptersDisabled, is_adapted


def frozen_copy(student: torch.nn.Module) -> torch.nn.Module:
    """A copy of `student` in eval mode whose parameters hold no gradients (requires_grad False)."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    for p in teacher.parameters():
        p.grad = None
    return teacher


class EMATeacher:
    """A self-teacher that follows the student: after each optimizer step, T <- rate * theta + (1 - rate) * T.

    The copy's parameters have requires_grad False and are updated in place under no_grad (one fused
    `torch._foreach_lerp_` over all tensors), so it carries no gradients and no optimizer state. Buffers (e.g.
    rotary frequencies) are copied, not averaged."""

    def __init__(self, student: torch.nn.Module, rate: float):
        if not 0 < rate <= 1:
            raise ValueError(f"privileged.ema_rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.model = frozen_copy(student)
        self._pairs = [(n, p) for n, p in self.model.named_parameters()]

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        src = dict(student.named_parameters())
        ema = [p for _, p in self._pairs]
        cur = [src[n].detach() for n, _ in self._pairs]
        torch._foreach_lerp_(ema, cur, self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._pairs}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self._pairs:
            p.copy_(state[n])


def make_teacher(cfg: PrivilegedConfig, student: torch.nn.Module, precision: str = "fp32"):
    """(teacher model, EMATeacher or None) for a self-teacher kind; the caller loads an external teacher itself.
    Under bf16-mixed precision the frozen copy is kept in bf16 (it is never updated); the EMA copy stays in fp32,
    where its small per-step updates are not rounded away."""
    if cfg.teacher == "frozen_student":
        teacher = frozen_copy(student)
        return (teacher.to(torch.bfloat16) if precision == "bf16-mixed" else teacher), None
    if cfg.teacher == "ema_student":
        ema = EMATeacher(student, cfg.ema_rate)
        return ema.model, ema
    if cfg.teacher == "lora_base":
        if not is_adapted(student):
            raise ValueError("privileged.teacher=lora_base needs a LoRA student (student.lora.r > 0)")
        return AdaptersDisabled(student), None
    raise ValueError(f"make_teacher: {cfg.teacher!r} is not a self-teacher (frozen_student, ema_student, lora_base)")
