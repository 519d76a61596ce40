"""The update guard: a learning rate that no config should accept is refused, and an update that would blow the
weights up is undone (weights and optimizer state), so no checkpoint ever holds such weights.

    python -m pytest tests/test_update_guard.py -q
"""
from __future__ import annotations

import pytest
import torch

from opdlab import cli
from opdlab.step import UpdateSnapshot
from opdlab.train import TrainingError, train
from test_train import assert_same_weights, init_weights, make_cfg, metric_rows, overrides, weights


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_learning_rate_is_refused_before_any_compute(model_dirs, tmp_path, capsys, value):
    run = tmp_path / "inf"
    code = cli.main(["train", "-", *overrides(model_dirs, run, f"train.lr={value}")])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr" in err and "Traceback" not in err
    assert not run.exists()


def test_runaway_update_is_undone_and_stops_the_run(model_dirs, tmp_path):
    """lr 1e10 moves the weights by ~1e10 of their size: every update is undone, nothing but the starting weights
    is ever saved, and after max_bad_steps the run stops with an error that says why."""
    run = tmp_path / "huge"
    with pytest.raises(TrainingError, match="2 bad steps in a row.*moved the weights by"):
        train(make_cfg(model_dirs, run, "train.lr=1e10", "train.warmup_steps=0", "train.steps=4",
                       "train.save_every=1", "train.max_bad_steps=2"), progress=False)
    assert_same_weights(weights(run, 1), init_weights(model_dirs), atol=0)
    assert not (run / "checkpoints" / "step-000002").exists()
    assert [r["train/skipped"] for r in metric_rows(run)] == [1.0]
    state = torch.load(run / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert not state["optimizer"]["state"]  # Adam never took the step


def test_runaway_update_through_the_cli_exits_non_zero(model_dirs, tmp_path, capsys):
    run = tmp_path / "huge_cli"
    code = cli.main(["train", "-", *overrides(model_dirs, run, "train.lr=1e10", "train.warmup_steps=0",
                                              "train.steps=2", "train.max_bad_steps=1")])
    err = capsys.readouterr().err
    assert code == 1 and "bad steps in a row" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step-*"))


def test_without_the_guard_non_finite_weights_stop_before_anything_is_saved(model_dirs, tmp_path, monkeypatch):
    run = tmp_path / "unguarded"

    def poison(self, *args, **kwargs):  # an optimizer step that leaves a NaN in the weights
        with torch.no_grad():
            for group in self.param_groups:
                group["params"][0].fill_(float("nan"))

    monkeypatch.setattr(torch.optim.AdamW, "step", poison)
    with pytest.raises(TrainingError, match="non-finite.*last checkpoint.*intact"):
        train(make_cfg(model_dirs, run, "train.max_update_ratio=0", "train.steps=3", "train.save_every=1"),
              progress=False)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step-*"))


def test_snapshot_restores_weights_and_adam_state_exactly():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for first in (True, False):  # before Adam has any state, and after
        layer(torch.randn(4, 8)).sum().backward()
        if not first:
            opt.step()
            layer(torch.randn(4, 8)).sum().backward()
        before = [p.detach().clone() for p in params]
        state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)
                        if p in opt.state}
        snap = UpdateSnapshot(params, opt)
        opt.step()
        assert snap.change_ratio(_OneProcess(), torch.device("cpu")) > 0
        snap.restore()
        for p, b in zip(params, before):
            assert torch.equal(p, b)
        assert {i: {k: v for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}.keys() \
            == state_before.keys()
        for i, saved in state_before.items():
            for k, v in saved.items():
                assert torch.equal(opt.state[params[i]][k], v)


def _adam_state(opt, params):
    return {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}


def _assert_state(opt, params, expected):
    assert {i for i, p in enumerate(params) if p in opt.state} == expected.keys()
    for i, saved in expected.items():
        for k, v in saved.items():
            assert torch.equal(opt.state[params[i]][k], v), (i, k)


def test_kept_snapshot_writes_into_its_buffers_and_restores_exactly():
    """With `keep` (a run on a CPU), each take copies into the buffers of the take before; restoring after any
    take, the first included, gives back exactly the weights and Adam state of that take, and later takes and
    restores stay exact after the restore swapped the state's tensors."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)

    def grads():
        opt.zero_grad(set_to_none=True)
        layer(torch.randn(4, 16)).square().sum().backward()

    grads()
    snap = UpdateSnapshot(params, opt, keep=True)  # before Adam has any state
    opt.step()
    snap.restore()
    assert not opt.state and all(torch.equal(p, v) for p, v in zip(params, snap.values))
    opt.step()
    value_ptrs = [v.data_ptr() for v in snap.values]
    for round_ in range(4):
        grads()
        before, state_before = [p.detach().clone() for p in params], _adam_state(opt, params)
        snap.take()
        assert [v.data_ptr() for v in snap.values] == value_ptrs  # the same buffers
        opt.step()
        assert snap.change_ratio(_OneProcess(), torch.device("cpu")) > 0
        if round_ % 2:  # undo every other update
            snap.restore()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            _assert_state(opt, params, state_before)
        else:
            assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_change_ratio_against_a_float64_computation():
    """||W_new - W_old|| / ||W_old|| over tensors larger than one norm piece (65,536 elements), with an update a
    millionth of the weights' size, as the float64 formula computes it."""
    from opdlab.step import SQUARES_PIECE
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5 * SQUARES_PIECE + 7,), (300, 1000), (3,), (0,)]]
    opt = torch.optim.SGD(params, lr=1.0)
    snap = UpdateSnapshot(params, opt)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 1e-6 * (1 + torch.rand_like(p)))
    diff2 = sum(((p.detach().double() - v.double()) ** 2).sum().item() for p, v in zip(params, snap.values))
    norm2 = sum((v.double() ** 2).sum().item() for v in snap.values)
    expected = (diff2 / norm2) ** 0.5
    assert snap.change_ratio(_OneProcess(), torch.device("cpu")) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        params[1][3, 4] = float("inf")
    assert snap.change_ratio(_OneProcess(), torch.device("cpu")) == float("inf")


class _OneProcess:
    """What `global_sum` needs of an accelerator, in one process."""

    def reduce(self, t, op):
        return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_finite_against_an_element_by_element_check(dtype):
    """The norm-first check agrees with checking every element: one NaN or infinity anywhere is found, and finite
    weights whose norm overflows (1e30 squared) are still finite."""
    from opdlab.step import weights_finite

    def check(params):
        return weights_finite(params, _OneProcess(), torch.device("cpu"))

    torch.manual_seed(0)
    shapes = [(5, 7), (0,), (3,), (4, 4, 2)]
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        for which in range(len(shapes)):
            params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
            assert check(params)
            if params[which].numel():
                with torch.no_grad():
                    params[which].view(-1)[-1] = bad_value
                assert not check(params), (bad_value, which)
    huge = [torch.nn.Parameter(torch.full((4, 3), 1e30, dtype=dtype)), torch.nn.Parameter(torch.randn(6))]
    assert not torch.isfinite(torch.linalg.vector_norm(huge[0].detach()))  # the overflow branch is taken
    assert check(huge)
    assert check([])
