"""Multi-process training (`opdlab.distributed`): two CPU processes (gloo, launched with torchrun) with
per-process batch B end with the weights of one process with batch 2B, for sampled-token `opd` and full-vocabulary
`reverse_kl`; a checkpoint written by two processes resumes in one; rollout rows do not depend on their batch.

    python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opdlab.config import save_config
from opdlab.distributed import row_generators, row_seeds, shard
from opdlab.models.prompts import stop_token_ids
from opdlab.rollout.builtin import sample
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.train import train
from test_train import assert_same_weights, init_weights, make_cfg, max_diff, metric_rows, weights

LAUNCH_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_step_metrics(rows_one: list[dict], rows_two: list[dict]) -> None:
    """Three logged steps with the same whole-batch numbers (loss, KL, grad norm, entropies to 1e-5; lengths and
    rewards exactly)."""
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two):
        for key in ("train/loss", "train/reverse_kl", "train/grad_norm", "student/entropy", "teacher/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert b["train/response_len"] == a["train/response_len"]
        assert b["train/reward"] == a["train/reward"]


def launch_two_processes(configs: list[Path], log: Path) -> str:
    """Runs tests/distributed_worker.py on `configs` in two gloo processes; returns the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).with_name("distributed_worker.py")),
           *map(str, configs)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=LAUNCH_TIMEOUT)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"two-process run failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


GLOBAL_BATCH = ["rollout.prompts_per_step=4", "train.steps=3", "train.save_every=3"]


@pytest.fixture(scope="module")
def two_process_runs(model_dirs, tmp_path_factory):
    """Three runs in one launch of two processes, per-process batch 2 (global 4), micro-batches of 1."""
    root = tmp_path_factory.mktemp("two_processes")
    runs = {"opd": ["objective.name=opd"], "reverse_kl": ["objective.name=reverse_kl"],
            "opd_first2": ["objective.name=opd", "train.steps=2", "train.save_every=2"]}
    configs = []
    for name, extra in runs.items():
        cfg = make_cfg(model_dirs, root / name, *GLOBAL_BATCH, "train.micro_batch_size=1", *extra)
        save_config(cfg, root / f"{name}.yaml")
        configs.append(root / f"{name}.yaml")
    output = launch_two_processes(configs, root / "launch.log")
    return root, output


@pytest.mark.parametrize("objective", ["opd", "reverse_kl"])
def test_two_processes_equal_one_process_with_twice_the_batch(two_process_runs, model_dirs, tmp_path, objective):
    root, output = two_process_runs
    assert "process 1 of 2" in output and "process 0 of 2" in output  # really two processes
    one = tmp_path / "one"
    train(make_cfg(model_dirs, one, *GLOBAL_BATCH, f"objective.name={objective}"), progress=False)

    # the logged numbers are the whole batch's, reduced over both processes
    rows_one, rows_two = metric_rows(one), metric_rows(root / objective)
    assert_same_step_metrics(rows_one, rows_two)
    w_one, w_two = weights(one, 3), weights(root / objective, 3)
    assert max_diff(w_one, init_weights(model_dirs)) > 1e-3  # training moved the weights
    # Same weights to fp32 tolerance. Adam divides by sqrt(v) + 1e-8, so an element whose gradient is itself near
    # 1e-8 turns the last-bit differences of a differently composed batch into a visible fraction of one lr step:
    # all but 1 in 1,000 elements must agree to 1e-6, and every element to 1e-4 (a tenth of one step at lr 1e-3).
    flat_one, flat_two = (torch.cat([w[k].flatten() for k in sorted(w)]) for w in (w_one, w_two))
    gap = (flat_one - flat_two).abs()
    assert (gap > 1e-6).float().mean() < 1e-3 and gap.max() < 1e-4, (int((gap > 1e-6).sum()), gap.max().item())
    # only the main process writes: one line per step, one checkpoint directory per save
    assert len((root / objective / "metrics.jsonl").read_text().splitlines()) == 3


def test_checkpoint_of_two_processes_resumes_in_one(two_process_runs, model_dirs, tmp_path):
    root, _ = two_process_runs
    run = root / "opd_first2"
    state = torch.load(run / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["data_position"] == 2 * 4  # the global stream position, not one process's share
    train(make_cfg(model_dirs, run, *GLOBAL_BATCH, "objective.name=opd"), resume=True, progress=False)
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, *GLOBAL_BATCH, "objective.name=opd"), progress=False)
    assert_same_weights(weights(run, 3), weights(reference, 3), atol=1e-6)
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]


def test_rollout_rows_do_not_depend_on_their_batch(student_model, tokenizer):
    problems = ArithmeticTask(seed=3, min_steps=1, max_steps=2).problems("train")[:6]
    seeds = row_seeds(0, 5, 0, len(problems))
    kw = dict(max_new_tokens=12, temperature=1.0, vocab_size=len(tokenizer))
    whole = sample(student_model, tokenizer, problems, generator=row_generators(seeds, torch.device("cpu")), **kw)
    halves = [sample(student_model, tokenizer, problems[i:i + 3], generator=row_generators(seeds[i:i + 3], "cpu"),
                     **kw) for i in (0, 3)]
    assert [t for h in halves for t in h.texts] == whole.texts
    for i in range(6):
        h, j = halves[i // 3], i % 3
        n = int(h.completion_mask_B_T[j].sum())
        assert n == int(whole.completion_mask_B_T[i].sum())
        assert torch.equal(h.completion_ids_B_T[j, :n], whole.completion_ids_B_T[i, :n])
        torch.testing.assert_close(h.logp_old_B_T[j, :n], whole.logp_old_B_T[i, :n], rtol=0, atol=1e-5)
    # seeds differ by step and by row, and are a function of (seed, step, row) only
    assert len(set(seeds)) == 6 and seeds != row_seeds(0, 6, 0, 6) and row_seeds(0, 5, 3, 3) == seeds[3:]
    assert len(set(whole.texts)) > 1
    stops = stop_token_ids(student_model, tokenizer)
    assert all(int(whole.completion_ids_B_T[i, int(whole.completion_mask_B_T[i].sum()) - 1]) in stops
               or int(whole.completion_mask_B_T[i].sum()) == 12 for i in range(6))


def test_shard_needs_a_batch_the_process_count_divides():
    items = list(range(6))
    assert shard(items, 1, 0) == (items, 0)
    assert [shard(items, 3, r) for r in range(3)] == [([0, 1], 0), ([2, 3], 2), ([4, 5], 4)]
    with pytest.raises(ValueError, match=r"rollout.prompts_per_step \(6\) must be divisible by the number of "
                                         r"processes \(4\)"):
        shard(items, 4, 0)
