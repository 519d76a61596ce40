"""FSDP2 (`opdlab.distributed`): two CPU processes (gloo) whose student is sharded by `fully_shard` end with the
weights (and the Adam state) of one process with twice the batch, for sampled-token `opd` and full-vocabulary
`reverse_kl`, with rollouts and evaluation on the sharded student; a checkpoint written by the two sharded
processes resumes in one plain process and in two sharded ones.

accelerate enables its FSDP plugin on GPUs only (on CPU it keeps DistributedType.MULTI_CPU and ignores the plugin),
so the worker below switches this CPU state to FSDP with an `fsdp_version=2` plugin by hand; `Accelerator.prepare`
then runs accelerate's own FSDP2 path (`fsdp2_prepare_model`: `fully_shard` on each decoder layer, then on the
`StudentDecoder` wrapper, and the optimizer switched to the sharded parameters), as it does under
`accelerate launch --use_fsdp --fsdp_version 2`. The training loop itself is not told anything.

    python -m pytest tests/test_fsdp.py -q
    torchrun --nproc_per_node 2 tests/test_fsdp.py [--resume] A.yaml B.yaml   # the worker (configs with device cpu)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401  (FSDP2)
    from torch.distributed.tensor import DTensor
    FSDP2 = dist.is_available() and dist.is_gloo_available()
except ImportError:
    FSDP2 = False


def fsdp2_accelerator(device: str):
    """`make_accelerator`, switched to accelerate's FSDP2 as a GPU launch with `--use_fsdp --fsdp_version 2
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` would set it up."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from opdlab.distributed import check_supported, make_accelerator
    accelerator = make_accelerator(device)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                                                   auto_wrap_policy="transformer_based_wrap")
    accelerator.state.distributed_type = DistributedType.FSDP
    check_supported(accelerator)
    prepare = accelerator.prepare

    def prepare_and_report(*args):  # what FSDP made of the student: its units and how much of it this rank holds
        prepared, optimizer = prepare(*args)
        from opdlab.distributed import fsdp_units
        params = list(prepared.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        full = sum(p.numel() for p in params)
        print(f"rank {accelerator.process_index}: {len(fsdp_units(prepared))} FSDP units, "
              f"{sum(isinstance(p, DTensor) for p in params)}/{len(params)} parameters sharded, "
              f"holds {local}/{full} values, optimizer over the sharded ones: "
              f"{all(a is b for a, b in zip(optimizer.param_groups[0]['params'], params))}", flush=True)
        return prepared, optimizer

    accelerator.prepare = prepare_and_report
    return accelerator


if __name__ == "__main__":  # the worker, in each of the two processes
    import opdlab.run
    import opdlab.train
    from opdlab.config import load_config

    torch.set_num_threads(1)
    opdlab.run.make_accelerator = fsdp2_accelerator
    resume = "--resume" in sys.argv[1:]
    paths = [a for a in sys.argv[1:] if a != "--resume"]
    for path in paths:
        opdlab.train.train(load_config(path), resume=resume, progress=False)
    print(f"process {dist.get_rank()} of {dist.get_world_size()}: trained {len(paths)} runs", flush=True)
    sys.exit(0)


from opdlab.checkpoint import load_optimizer_state  # noqa: E402
from opdlab.config import load_config, save_config  # noqa: E402
from opdlab.distributed import check_supported, full_params  # noqa: E402
from opdlab.train import train  # noqa: E402
from test_distributed import GLOBAL_BATCH, LAUNCH_TIMEOUT, assert_same_step_metrics, free_port  # noqa: E402
from conftest import STUDENT_SIZE, tiny_llama  # noqa: E402
from test_train import init_weights, make_cfg, max_diff, metric_rows, weights  # noqa: E402

pytestmark = pytest.mark.skipif(not FSDP2, reason="torch.distributed with gloo and FSDP2 (fully_shard) unavailable")

EVAL = ["train.eval_every=3", "eval.num_problems=4", "eval.k=2", "eval.max_new_tokens=8", "eval.batch_size=8"]
# every step saved, so the resume test can restart the two-process opd run from its step 2
SAVE = ["train.save_every=1", "train.keep_checkpoints=5"]
RUNS = {"opd": ["objective.name=opd", *EVAL, *SAVE], "reverse_kl": ["objective.name=reverse_kl", *SAVE]}


def launch_two_fsdp_processes(configs: list[Path], log: Path, *flags: str) -> str:
    """This file's worker on `configs` in two gloo processes (as `test_distributed.launch_two_processes`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, *flags, *map(str, configs)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=LAUNCH_TIMEOUT)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"two-process FSDP run failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def assert_weights_agree(a: dict, b: dict) -> tuple[float, int, int]:
    """The criterion of `test_distributed`: Adam divides by sqrt(v) + 1e-8, so an element whose gradient is itself
    near 1e-8 turns last-bit differences of a differently composed batch into a visible fraction of one lr step;
    all but 1 in 1,000 elements must agree to 1e-6, and every element to 1e-4. Returns (max |diff|, the number of
    elements over 1e-6, the number of elements)."""
    assert a.keys() == b.keys()
    flat_a, flat_b = (torch.cat([w[k].flatten() for k in sorted(w)]) for w in (a, b))
    gap = (flat_a - flat_b).abs()
    n_over = int((gap > 1e-6).sum())
    assert n_over < 1e-3 * len(gap) and gap.max() < 1e-4, (n_over, gap.max().item())
    return gap.max().item(), n_over, len(gap)


def report(name: str, line: str) -> None:  # the measured numbers, shown with `pytest -s`
    print(f"\n[{name}] {line}")


@pytest.fixture(scope="module")
def students(model_dirs, tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Model directories per run: `opd` trains conftest's student (output layer tied to the input embedding, one
    parameter for both), `reverse_kl` the same student untied (its output layer a parameter of its own)."""
    untied = tmp_path_factory.mktemp("untied") / "student"
    tiny_llama(tokenizer, 1, **{**STUDENT_SIZE, "tie_word_embeddings": False}).save_pretrained(untied)
    tokenizer.save_pretrained(untied)
    return {"opd": model_dirs, "reverse_kl": {**model_dirs, "student": untied}}


@pytest.fixture(scope="module")
def fsdp_runs(students, tmp_path_factory):
    """Both runs in one launch of two FSDP2 processes, per-process batch 2 (global 4), micro-batches of 1."""
    root = tmp_path_factory.mktemp("fsdp")
    configs = []
    for name, extra in RUNS.items():
        cfg = make_cfg(students[name], root / name, *GLOBAL_BATCH, "train.micro_batch_size=1", *extra)
        save_config(cfg, root / f"{name}.yaml")
        configs.append(root / f"{name}.yaml")
    output = launch_two_fsdp_processes(configs, root / "launch.log")
    return root, output


@pytest.fixture(scope="module")
def one_process_runs(students, tmp_path_factory):
    """The same runs in this process, batch 4 (no micro-batches)."""
    root = tmp_path_factory.mktemp("one_process")
    for name, extra in RUNS.items():
        train(make_cfg(students[name], root / name, *GLOBAL_BATCH, *extra), progress=False)
    return root


@pytest.mark.parametrize("objective", ["opd", "reverse_kl"])
def test_fsdp_two_processes_equal_one_process_with_twice_the_batch(fsdp_runs, one_process_runs, students,
                                                                   objective):
    root, output = fsdp_runs
    assert "process 0 of 2" in output and "process 1 of 2" in output
    # really sharded: the wrapper and its one decoder layer are FSDP units, every parameter a DTensor of which
    # each rank holds about half, and the optimizer steps the shards
    units = re.findall(r"rank (\d): (\d+) FSDP units, (\d+)/(\d+) parameters sharded, holds (\d+)/(\d+) values, "
                       r"optimizer over the sharded ones: (\w+)", output)
    assert len(units) == 2 * len(RUNS)
    assert {u[3] for u in units} == {"11", "12"}  # the tied and the untied student
    for _, n_units, sharded, n_params, local, full, switched in units:
        assert int(n_units) == 2 and sharded == n_params and switched == "True"
        assert abs(int(local) - int(full) / 2) < 0.01 * int(full)

    one, two = one_process_runs / objective, root / objective
    # the gradients: at step 1 Adam's first moment is (1 - beta1) * g, so the step-1 checkpoints hold the whole
    # batch's (clipped) gradient, gathered from the shards on the FSDP side
    s_one, s_two = (torch.load(run / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
                    ["optimizer"] for run in (one, two))
    assert s_two["state"].keys() == s_one["state"].keys()
    grad_gap = max(((a["exp_avg"] - s_one["state"][k]["exp_avg"]).abs().max()
                    / s_one["state"][k]["exp_avg"].abs().max()).item() for k, a in s_two["state"].items())
    report(objective, f"step-1 gradients: FSDP vs one process max |diff| / max |grad| per tensor {grad_gap:.1e}")
    assert grad_gap < 1e-5

    w_one, w_two = weights(one, 3), weights(two, 3)
    moved = max_diff(w_one, init_weights(students[objective]))
    assert moved > 1e-3  # training moved the weights
    gap, n_over, n = assert_weights_agree(w_two, w_one)
    report(objective, f"3 steps: weights moved by up to {moved:.1e}; FSDP vs one process max |diff| {gap:.1e}, "
                      f"{n_over} of {n} elements differ by more than 1e-6")
    # the checkpoint holds the whole optimizer state, gathered: the same Adam moments as one process's
    s_one, s_two = (torch.load(run / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
                    ["optimizer"] for run in (one, two))
    assert s_two["state"].keys() == s_one["state"].keys() and len(s_two["state"]) == len(w_two)
    worst = 0.0  # largest difference relative to the tensor's largest value
    for name, st in s_two["state"].items():
        assert st["exp_avg"].shape == w_two[name].shape and int(st["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            ref = s_one["state"][name][key]
            worst = max(worst, ((st[key] - ref).abs().max() / ref.abs().max()).item())
    report(objective, f"Adam moments at step 3: FSDP vs one process max |diff| / max |value| per tensor {worst:.1e}")
    assert worst < 1e-4
    # the logged numbers are the whole batch's
    rows_one, rows_two = metric_rows(one), metric_rows(two)
    assert_same_step_metrics(rows_one, rows_two)
    for a, b in zip(rows_one, rows_two):
        # evaluation on the sharded student (main process, parameters gathered) samples what one process samples
        assert {k: v for k, v in b.items() if k.startswith("eval/")} == \
            {k: v for k, v in a.items() if k.startswith("eval/")}
    if objective == "opd":
        assert "eval/mean@2" in rows_two[-1]


def run_as_of_step_2(run: Path, dest: Path) -> Path:
    """A copy of the two-process opd run as it was after step 2 (its step-3 checkpoint removed); its config file."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-000003")
    (dest / "checkpoints" / "latest").write_text("step-000002")
    cfg = load_config(dest / "config.yaml")
    cfg.run_dir = str(dest)
    save_config(cfg, dest / "config.yaml")
    return dest / "config.yaml"


@pytest.mark.parametrize("processes", [1, 2])
def test_fsdp_checkpoint_resumes_in_one_process_or_two(fsdp_runs, one_process_runs, tmp_path, processes):
    """The two FSDP processes' step-2 checkpoint, resumed in one plain process or in two FSDP processes (the whole
    optimizer state scattered to the shards), ends step 3 with the weights of the uninterrupted one-process run."""
    root, _ = fsdp_runs
    config = run_as_of_step_2(root / "opd", tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["data_position"] == 2 * 4 and all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())
    if processes == 1:
        train(load_config(config), resume=True, progress=False)
    else:
        output = launch_two_fsdp_processes([config], tmp_path / "launch.log", "--resume")
        assert "process 0 of 2" in output and "process 1 of 2" in output
    run = tmp_path / "resumed"
    gap, n_over, n = assert_weights_agree(weights(run, 3), weights(one_process_runs / "opd", 3))
    report(f"resume in {processes}", f"FSDP step-2 checkpoint resumed in {processes} process(es): step-3 weights vs "
                                     f"one process max |diff| {gap:.1e}, {n_over} of {n} elements over 1e-6")
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    # the resumed run's Adam state went on from the checkpoint's: step 3, not 1
    final = torch.load(run / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert all(int(s["step"]) == 3 for s in final["state"].values())


def test_fsdp1_is_refused_with_what_to_use_instead():
    from accelerate.utils import DistributedType
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP,
                            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match=r"FSDP1 is not supported.*--fsdp_version 2.*--multi_gpu"):
        check_supported(fsdp1)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP,
                            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    check_supported(fsdp2)
    check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


def test_full_params_is_a_no_op_without_fsdp(student_model):
    before = {n: p.clone() for n, p in student_model.named_parameters()}
    with full_params(student_model):
        assert all(type(p) is torch.nn.Parameter for p in student_model.parameters())
    assert all(torch.equal(before[n], p) for n, p in student_model.named_parameters())


def test_index_keyed_optimizer_state_of_earlier_checkpoints_loads(student_model):
    """Checkpoints written before FSDP support keyed the Adam state by parameter index."""
    params = list(student_model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    student_model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    student_model.zero_grad(set_to_none=True)  # as at the start of a resumed run
    fresh = torch.optim.AdamW(params, lr=1e-2)
    load_optimizer_state(student_model, fresh, opt.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
