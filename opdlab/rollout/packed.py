"""Decoding with the student's Linear weights prepacked for oneDNN (CPU, bf16 autocast).

A decoding step multiplies a handful of rows (the batch) by every weight matrix of the model. On a CPU under bf16
autocast each such `F.linear` goes to oneDNN with the weight in its plain layout, which oneDNN reorders into its
blocked one (or reads in the slower plain one) on every call; at a batch of 8 that is a large share of the call.
Reordering each weight once per `sample` call, for the batch size decoding will use, and calling oneDNN's linear on
the packed copy removes that cost (bench/decode_linear.py measures both side by side: on a 2-core AVX512-BF16 CPU
the SmolLM2 student's products at 8 rows ran 1.37x faster, and its sampling 1.24x, docs/benchmarks.md).

`packed_linears(model, rows)` does this for every `torch.nn.Linear` of the model (LoRA's base and adapter layers
included) for the duration of a `with` block and puts the modules back as they were after it. A Linear whose
`forward` is already replaced on the instance (accelerate's hooks, e.g. for offloaded weights) is left as it is. The
packed copies are bf16, as autocast's casts would be, so the products are the same up to the summation order inside
the kernel; `tests/test_samplers.py` checks them against the plain path.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def packing_supported(device: torch.device) -> bool:
    """True where oneDNN's prepacked bf16 linear runs: a CPU with AVX512 (bf16 support in oneDNN) and mkldnn built."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_packing(setting: str, device: torch.device) -> bool:
    """Whether `rollout.packed_linears` = `setting` packs here: 'auto' where it is supported and sampling runs
    under bf16 autocast (bf16-mixed precision), 'off' never."""
    if setting not in ("auto", "off"):
        raise ValueError(f"packed_linears must be 'auto' or 'off', got {setting!r}")
    if setting == "off":
        return False
    return torch.is_autocast_enabled(device.type) and \
        torch.get_autocast_dtype(device.type) == torch.bfloat16 and packing_supported(device)


class PackedLinear:
    """A Linear's forward on a packed bf16 copy of its weight (and a bf16 copy of its bias)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        w = linear.weight.detach().to(torch.bfloat16)
        self.out_features = w.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x_2d = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y_2d = torch.ops.mkldnn._linear_pointwise(x_2d, self.packed, self.bias, "none", [], "")
        return y_2d.reshape(*x.shape[:-1], self.out_features)


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int, enabled: bool = True) -> Iterator[None]:
    """Within the block, every `torch.nn.Linear` of `model` runs on a bf16 copy of its weight packed for `rows`
    input rows (any row count still works, at the plain speed). For inference only: no gradient flows to the
    weights, and weights changed inside the block are not seen."""
    if not enabled:
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in vars(m)]
    packs: dict[int, PackedLinear] = {}  # keyed by weight, so modules that share a weight share its packed copy
    for m in linears:
        key = id(m.weight)
        if key not in packs:
            packs[key] = PackedLinear(m, rows)
        m.forward = packs[key]  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield
    finally:
        for m in linears:
            del m.forward
