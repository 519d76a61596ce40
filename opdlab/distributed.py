"""What the training loop needs to run as one process or as many (`accelerate launch`), with one code path.

    accelerate launch --multi_gpu --num_processes 2 -m opdlab.cli train CONFIG.yaml   # DDP, one process per GPU
    torchrun --nproc_per_node 2 -m opdlab.cli train CONFIG.yaml device=cpu              # two CPU processes, gloo

A step's prompts are drawn from the same seeded stream on every process and each process takes its contiguous
share (`shard`), so a run with W processes sees the same prompts, in the same order, as a run with one. Every
rollout row samples from its own generator seeded by (seed, step, global row index) (`row_seeds`), so a row draws
the same tokens whichever process, and whichever batch, it lands in. The loss of a micro-batch is weighted by its
share of the global loss-token count (all-reduced), so the summed gradient equals the single-process one; DDP
averages gradients over processes, hence the factor W in `loss_scale`.

The student is handed to `Accelerator.prepare` as `StudentDecoder` (its decoder as one module returning the last
hidden states), so every differentiable forward goes through the DDP wrapper, and `PreparedStudent` presents that
wrapper with the model interface `opdlab.logprobs.student_forward` reads (`get_decoder`, `get_output_embeddings`,
`config`). Sampling, evaluation and checkpoints use the plain model, which is why FSDP is refused for now: with
FSDP2 (`fully_shard`, two gloo processes) the gradients through this wrapper equal the single-process ones times
1/W, as `loss_scale` expects, but sampling from the sharded model stops with a DTensor error, and checkpoints would
hold shards.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object


def make_accelerator(device: str) -> Accelerator:
    """This process's `Accelerator`. With `device` 'cpu' under a multi-process launch (torchrun sets WORLD_SIZE)
    the processes talk over gloo; a single process never asks for cpu, because accelerate's process-wide state
    cannot switch between CPU and GPU within one process (and a single process uses `device` as configured)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=device == "cpu" and launched, device_placement=False)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "FSDP is not supported by the training loop yet: gradients through the FSDP wrapper are right, but "
            "rollouts, evaluation and checkpoints use the student's parameters outside the wrapped forward, where "
            "FSDP leaves them sharded. Launch with DDP (`accelerate launch --multi_gpu ...`) instead")
    return accelerator


class StudentDecoder(torch.nn.Module):
    """A causal LM's decoder as a module whose forward returns the decoder's output (last hidden states), the
    unit `Accelerator.prepare` wraps. Its parameters are the whole model's, output layer included."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, **inputs):
        return self.lm.get_decoder()(**inputs)


class PreparedStudent:
    """The student as `student_forward` sees it: decoder calls go through the prepared (DDP) wrapper."""

    def __init__(self, lm: torch.nn.Module, prepared: torch.nn.Module):
        self.lm, self.prepared = lm, prepared

    @property
    def config(self):
        return self.lm.config

    def get_decoder(self) -> torch.nn.Module:
        return self.prepared

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.get_output_embeddings()


def shard(items: list, num_processes: int, rank: int, what: str = "rollout.prompts_per_step") -> tuple[list, int]:
    """Process `rank`'s contiguous share of `items` and the global index of its first item; W must divide."""
    W = num_processes
    if len(items) % W:
        raise ValueError(f"{what} ({len(items)}) must be divisible by the number of processes ({W})")
    n = len(items) // W
    return items[rank * n:(rank + 1) * n], rank * n


def row_seeds(seed: int, step: int, first_row: int, n: int) -> list[int]:
    """One 63-bit seed per rollout row, a function of (run seed, step, global row index) only."""
    return [int(np.random.SeedSequence([seed % 2**32, step, first_row + i]).generate_state(1, np.uint64)[0]) >> 1
            for i in range(n)]


def row_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def loss_scale(accelerator: Accelerator) -> float:
    """DDP averages gradients over processes; the loop's losses are shares of a global sum, so undo the mean."""
    return float(accelerator.num_processes)


def global_sum(accelerator: Accelerator, value: float, device: torch.device) -> float:
    """`value` summed over processes (float64)."""
    return accelerator.reduce(torch.tensor(float(value), dtype=torch.float64, device=device), "sum").item()


def sum_dicts(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of every process's dict (a key missing on a process counts as 0 there)."""
    parts = gather_object([values]) if accelerator.num_processes > 1 else [values]
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def gather_list(accelerator: Accelerator, values: list) -> list:
    """Every process's list, concatenated in process order."""
    return list(gather_object(list(values))) if accelerator.num_processes > 1 else list(values)
