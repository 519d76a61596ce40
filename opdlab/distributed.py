"""What the training loop needs to run as one process or as many (`accelerate launch`), with one code path.

    accelerate launch --multi_gpu --num_processes 2 -m opdlab.cli train CONFIG.yaml   # DDP, one process per GPU
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
        --num_processes 2 -m opdlab.cli train CONFIG.yaml                               # FSDP2: the student sharded
    torchrun --nproc_per_node 2 -m opdlab.cli train CONFIG.yaml device=cpu              # two CPU processes, gloo

A step's prompts are drawn from the same seeded stream on every process and each process takes its contiguous
share (`shard`), so a run with W processes sees the same prompts, in the same order, as a run with one. Every
rollout row samples from its own generator seeded by (seed, step, global row index) (`row_seeds`), so a row draws
the same tokens whichever process, and whichever batch, it lands in. The loss of a micro-batch is weighted by its
share of the global loss-token count (all-reduced), so the summed gradient equals the single-process one; DDP
averages gradients over processes, and so does FSDP's reduce-scatter, hence the factor W in `loss_scale`.

The student is handed to `Accelerator.prepare` as `StudentDecoder` (its decoder as one module returning the last
hidden states), so every differentiable forward goes through the DDP or FSDP wrapper, and `PreparedStudent`
presents that wrapper with the model interface `opdlab.models.logprobs.student_forward` reads (`get_decoder`,
`get_output_embeddings`, `config`). Under FSDP2 accelerate applies `fully_shard` to each decoder layer
(`StudentDecoder` forwards the model's `_no_split_modules`, which TRANSFORMER_BASED_WRAP reads) and then to the
wrapper, whose unit holds the embedding, the final norm and the output layer; it stays unsharded from the forward
until the backward, so the output layer applied to the hidden states outside the wrapped forward (the chunked
log-probs) sees its whole weight and its gradient is reduce-scattered with the unit's. Everything else that calls
the plain model (sampling, evaluation, the fidelity probe, an EMA teacher's update, lookahead scoring) runs inside
`full_params(prepared)`, which unshards every unit for the block and reshards after it, and is a no-op under DDP
and in one process. Checkpoints hold the whole model and optimizer state, gathered onto the main process
(`opdlab.checkpoint.full_state`), so they resume with any process count, sharded or not. FSDP1 is refused
(`check_supported`), and so is the vLLM rollout backend under FSDP (`train` stops at start-up: its weight push
reads the student's state dict, which FSDP holds in shards). Not run here: FSDP2 on GPUs (NCCL), with mixed
precision, CPU offload or activation checkpointing.

What was checked, on CPU with two gloo processes (`tests/test_fsdp.py`; accelerate enables its FSDP plugin on GPUs
only, so the test switches accelerate's CPU state to FSDP2 and `prepare` runs accelerate's own FSDP2 path): see
docs/scaling.md#students-that-do-not-fit-one-gpu-fsdp2 for the numbers.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

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
    check_supported(accelerator)
    return accelerator


def check_supported(accelerator) -> None:
    """Refuse what the loop does not support: FSDP1 (accelerate's default `--fsdp_version`), whose flat parameters
    `full_params` and the checkpoint's state gathering do not handle."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP1 is not supported by the training loop (accelerate's default --fsdp_version is 1): launch with "
            "FSDP2, `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP "
            "...` (or `fsdp_version: 2` in the config file), or with DDP (`accelerate launch --multi_gpu ...`)")


def fsdp_units(prepared: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 modules (`fully_shard` units) of the prepared student, root first; [] under DDP or one process."""
    try:
        from torch.distributed.fsdp import FSDPModule  # lazy: only multi-process runs load torch's FSDP
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in prepared.modules() if isinstance(m, FSDPModule)]


def _param_groups(unit) -> list:
    state = unit._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):  # torch 2.13, as here: a unit may hold several groups
        return list(state._fsdp_param_groups)
    return [state._fsdp_param_group] if state._fsdp_param_group is not None else []  # earlier: one at most


@contextmanager
def full_params(prepared: torch.nn.Module, enabled: bool = True):
    """The student's whole parameters for the block: sampling, evaluation, an EMA update, anything that calls the
    plain model rather than the prepared wrapper. Under FSDP2 every unit is unsharded (an all-gather, so every
    process must enter the block, even one that then does nothing in it) and kept unsharded through any forward in
    the block (no collective inside it, so processes may run different numbers of forwards), then resharded.
    A no-op under DDP and in one process, and when `enabled` is False."""
    units = fsdp_units(prepared) if enabled else []
    if not units:
        yield
        return
    # FSDP2 takes the first unit to run forward as the root; sampling calls the layers directly, so make sure the
    # wrapper (the unit `fully_shard` was applied to last) is the root before anything runs. (FSDP2 internals, as
    # of torch 2.13; `set_reshard_after_forward` is public but cannot say what to restore.)
    units[0]._get_fsdp_state()._lazy_init()
    groups = [g for u in units for g in _param_groups(u)]
    after_forward = [g.post_forward_mesh_info for g in groups]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    handles = [u.unshard(async_op=True) for u in units]
    try:
        for h in handles:
            h.wait()
        yield
    finally:
        for g, info in zip(groups, after_forward):
            g.post_forward_mesh_info = info
        for u in units:
            u.reshard()


class StudentDecoder(torch.nn.Module):
    """A causal LM's decoder as a module whose forward returns the decoder's output (last hidden states), the
    unit `Accelerator.prepare` wraps. Its parameters are the whole model's, output layer included."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def _no_split_modules(self):  # the layer classes accelerate's TRANSFORMER_BASED_WRAP shards one by one
        return getattr(self.lm, "_no_split_modules", None)

    def forward(self, **inputs):
        return self.lm.get_decoder()(**inputs)


class PreparedStudent:
    """The student as `student_forward` sees it: decoder calls go through the prepared (DDP or FSDP2) wrapper. The
    output layer is the plain model's; under FSDP2 its weight belongs to the wrapper's root unit, which stays
    unsharded from the wrapper's forward until the backward is done, so applying it to the hidden states outside
    the wrapped forward (as `student_forward` does, in chunks) sees the whole weight and its gradient is
    reduce-scattered with the root's."""

    def __init__(self, lm: torch.nn.Module, prepared: torch.nn.Module):
        self.lm, self.prepared = lm, prepared

    @property
    def config(self):
        return self.lm.config

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model (under a peft wrapper, its base model), whose attention implementation the
        packed forwards switch (`opdlab.models.packing`); the prepared wrapper calls that same model."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

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
