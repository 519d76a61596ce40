"""`opdlab.models.logprobs.linear_cross_entropy`: the summed cross-entropy of an output layer's logits, with its
gradients made chunk by chunk in the forward pass, against `F.cross_entropy` on the full logits.

    python -m pytest tests/test_linear_cross_entropy.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opdlab.models import logprobs
from opdlab.models.logprobs import chunk_logits, linear_cross_entropy

N, H, V = 300, 24, 97


def inputs(seed: int, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V + 3, bias=bias)  # 3 padding rows past the vocabulary, as some models have
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + 3, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V + 3, generator=g))
    hidden_N_H = torch.randn(N, H, generator=g).requires_grad_()
    return hidden_N_H, head, torch.randint(0, V, (N,), generator=g)


def reference(hidden_N_H, head, targets_N, softcap):
    return F.cross_entropy(chunk_logits(hidden_N_H, head, V, softcap), targets_N, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size,block", [(64, 4096), (7, 14), (1000, 4096)])
def test_loss_and_gradients_equal_full_logits(monkeypatch, softcap, chunk_size, block):
    """Chunks that do not divide N, a weight gradient flushed every `block` positions, soft-capping: the loss and the
    gradients of the hidden states and of the weight are those of the full logits (fp32)."""
    monkeypatch.setattr(logprobs, "GRAD_W_BLOCK", block)
    hidden_N_H, head, targets_N = inputs(0)
    got = linear_cross_entropy(hidden_N_H, head, targets_N, V, softcap, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(3 * got, [hidden_N_H, head.weight])  # a factor, so grad_output is not 1
    ref = reference(hidden_N_H, head, targets_N, softcap)
    ref_grads = torch.autograd.grad(3 * ref, [hidden_N_H, head.weight])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    for g, r in zip(got_grads, ref_grads):  # logits of size ~5 here: fp32 sums differ in the 6th digit
        torch.testing.assert_close(g, r, rtol=1e-5, atol=2e-5)
    assert got_grads[1][V:].abs().sum() == 0  # the padding rows get no gradient


def test_frozen_weight_and_no_grad():
    hidden_N_H, head, targets_N = inputs(1)
    head.weight.requires_grad_(False)
    got = linear_cross_entropy(hidden_N_H, head, targets_N, V)
    (grad,) = torch.autograd.grad(got, [hidden_N_H])
    ref = reference(hidden_N_H, head, targets_N, None)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, [hidden_N_H])[0], rtol=1e-5, atol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden_N_H, head, targets_N, V), ref.detach())


def test_a_head_with_a_bias_goes_through_the_logits():
    """Not a plain bias-free Linear: the chunked logits path, with the same loss and gradients (bias included)."""
    hidden_N_H, head, targets_N = inputs(2, bias=True)
    got = linear_cross_entropy(hidden_N_H, head, targets_N, V, chunk_size=64)
    ref = reference(hidden_N_H, head, targets_N, None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    wrt = [hidden_N_H, head.bias]
    for g, r in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=2e-5)


def test_bf16_autocast_matches_the_autocast_logits():
    """Under bf16 autocast the products run in bf16 and the softmax in fp32, as the logits path does there: loss
    and gradients agree with it to bf16 rounding, and both are near fp32."""
    hidden_N_H, head, targets_N = inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden_N_H, head, targets_N, V)
        ref = reference(hidden_N_H, head, targets_N, None)
    exact = reference(hidden_N_H, head, targets_N, None)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 1e-3 * ref.item()
    assert abs(got.item() - exact.item()) <= 1e-2 * exact.item()
    for g, r in zip(torch.autograd.grad(got, [hidden_N_H, head.weight]),
                    torch.autograd.grad(ref, [hidden_N_H, head.weight])):
        assert g.dtype == r.dtype == torch.float32
        assert (g - r).norm() <= 2e-2 * r.norm()
