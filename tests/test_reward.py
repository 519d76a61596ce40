"""Tests of the task-reward term (`objective.reward_weight`): GRPO's group normalisation against a hand computation
with `statistics`, the sampled-token objectives with weight 0 (exactly today's objective) and with the teacher term
off (GRPO's token-level policy gradient, written out token by token), the config errors, and the training loop's
plumbing (the advantages the objective receives, the group metrics and their null).

    python -m pytest tests/test_reward.py -q
"""
from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from opdlab.config import ConfigError, load_config
from opdlab.objectives import OBJECTIVES, Objective
from opdlab.objectives.common import REWARD_EPS, group_normalised_rewards
from opdlab.objectives.opd import sampled_token_opd
from opdlab.run import load_run_config
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.train import train
from test_lookahead import LOGP_NEW, LOGP_OLD, LOGP_T, LOSS, hand_made
from test_objectives import make_batch
from test_train import init_weights, max_diff, metric_rows, overrides, weights

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0]


def hand_grpo(rewards: list[float], n: int, norm: str = "std") -> list[float]:
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        mean = statistics.fmean(group)
        scale = statistics.stdev(group) + REWARD_EPS if norm == "std" else 1.0
        out += [(r - mean) / scale for r in group]
    return out


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("norm", ["std", "mean"])
def test_group_normalisation_matches_statistics(n, norm):
    got = group_normalised_rewards(torch.tensor(REWARDS), n, norm)
    assert got.tolist() == pytest.approx(hand_grpo(REWARDS, n, norm), abs=1e-6)
    flat = group_normalised_rewards(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2, norm)
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]  # a group of equal rewards carries no signal


def test_group_normalisation_refuses_groups_that_do_not_divide_the_batch():
    with pytest.raises(ValueError, match="5 rewards in groups of 2"):
        group_normalised_rewards(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="groups of >= 2"):
        group_normalised_rewards(torch.zeros(4), 1)


def opd_batch(seed: int = 0, B: int = 4, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    student_logp = (logp_old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, 6, (B, T), generator=g)
    return make_batch(ids, mask, logp_old, student_logp, teacher_logp)


def objective_cfg(*extra):
    return load_config(None, ["rollout.samples_per_prompt=2", *extra]).objective


def loss_and_grad(fn, rollouts, student, teacher, cfg):
    student.logp_B_T.grad = None
    out = fn(rollouts, student, teacher, cfg)
    out.loss.backward()
    return out, student.logp_B_T.grad.clone()


@pytest.mark.parametrize("extra", [[], ["objective.clip_eps=0.05"], ["objective.discount=0.9"]])
def test_weight_zero_is_exactly_todays_opd(extra):
    rollouts, student, teacher = opd_batch()
    with_adv = replace(rollouts, reward_advantage_B=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    before, g_before = loss_and_grad(sampled_token_opd, rollouts, student, teacher, objective_cfg(*extra))
    after, g_after = loss_and_grad(sampled_token_opd, with_adv, student, teacher,
                                   objective_cfg("objective.reward_weight=0", *extra))
    assert torch.equal(before.loss, after.loss) and torch.equal(g_before, g_after)
    assert before.metrics == after.metrics and "train/reward_share" not in after.metrics
    # and a weight > 0 does change it (the comparison above can fail)
    mixed, _ = loss_and_grad(sampled_token_opd, with_adv, student, teacher,
                             objective_cfg("objective.reward_weight=0.5", *extra))
    assert abs(mixed.loss.item() - before.loss.item()) > 1e-3


@pytest.mark.parametrize("w, kappa, norm", [(1.0, 0.0, "std"), (0.7, 0.0, "mean"), (0.5, 1.3, "std")])
def test_opd_with_reward_is_the_hand_computed_policy_gradient(w, kappa, norm):
    """kappa = 0: GRPO's token-level policy gradient L = -sum_i A_i sum_t ratio_t / n; kappa > 0: the two terms add."""
    rollouts, student, teacher = opd_batch(seed=1)
    rewards = [1.0, 0.0, 0.3, 0.3]  # group 0 mixed, group 1 flat
    adv = hand_grpo(rewards, 2, norm)
    rollouts = replace(rollouts, reward_advantage_B=group_normalised_rewards(torch.tensor(rewards), 2, norm))
    cfg = objective_cfg(f"objective.reward_weight={w}", f"objective.kl_coef={kappa}", f"objective.reward_norm={norm}")
    out, grad = loss_and_grad(sampled_token_opd, rollouts, student, teacher, cfg)
    mask = rollouts.loss_mask_B_T.tolist()
    n = sum(map(sum, mask))
    loss, reward_size, teacher_size = 0.0, 0.0, 0.0
    for i in range(4):
        for t in range(5):
            if not mask[i][t]:
                assert grad[i, t].item() == 0.0
                continue
            old, new, tea = (x[i, t].item() for x in (rollouts.logp_old_B_T, student.logp_B_T, teacher.logp_B_T))
            ratio = torch.exp(torch.tensor(new - old, dtype=torch.float64)).item()
            a_t = -kappa * (old - tea) + w * adv[i]
            loss -= ratio * a_t / n
            assert grad[i, t].item() == pytest.approx(-ratio * a_t / n, rel=1e-6), (i, t)
            reward_size += abs(w * adv[i])
            teacher_size += abs(kappa * (old - tea))
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.metrics["train/reward_share"] == pytest.approx(reward_size / (reward_size + teacher_size), abs=1e-6)
    if kappa == 0:
        assert out.metrics["train/reward_share"] == pytest.approx(1.0)


def test_lookahead_takes_the_reward_term_and_is_unchanged_at_weight_zero():
    rollouts, student, teacher = hand_made()
    cfg0 = load_config(None, ["objective.name=lookahead", "objective.lookahead.gamma=0"]).objective
    base, g_base = loss_and_grad(OBJECTIVES["lookahead"], rollouts, student, teacher, cfg0)
    with_adv = replace(rollouts, reward_advantage_B=torch.tensor([0.8, -0.8]))
    same, g_same = loss_and_grad(OBJECTIVES["lookahead"], with_adv, student, teacher, cfg0)
    assert torch.equal(base.loss, same.loss) and torch.equal(g_base, g_same)
    cfg = load_config(None, ["objective.name=lookahead", "objective.lookahead.gamma=0", "objective.reward_weight=2",
                             "rollout.samples_per_prompt=2"]).objective
    _, grad = loss_and_grad(OBJECTIVES["lookahead"], with_adv, student, teacher, cfg)
    n = sum(map(sum, LOSS))
    for b in range(2):
        for t in range(4):
            ratio = torch.exp(torch.tensor(LOGP_NEW[b][t] - LOGP_OLD[b][t])).item()
            a_t = -(LOGP_OLD[b][t] - LOGP_T[b][t]) + 2 * [0.8, -0.8][b]
            expected = -ratio * a_t / n if LOSS[b][t] else 0.0
            assert grad[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)


def test_missing_group_rewards_is_a_clear_error():
    rollouts, student, teacher = opd_batch()
    with pytest.raises(ValueError, match="reward_advantage_B"):
        sampled_token_opd(rollouts, student, teacher, objective_cfg("objective.reward_weight=1"))


def test_config_errors_name_the_field_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"samples_per_prompt >= 2 \(got 1\)"):
        load_config(None, ["objective.reward_weight=1"])
    with pytest.raises(ConfigError, match=r"objective.reward_weight: 'forward_kl' has no sampled-token advantage.*"
                                          r"objectives with one: lookahead, opd"):
        load_run_config(None, ["objective.name=forward_kl", "objective.reward_weight=1",
                               "rollout.samples_per_prompt=4"])
    with pytest.raises(ConfigError, match="objective.reward_norm"):
        load_config(None, ["objective.reward_norm=z"])
    with pytest.raises(ConfigError, match="objective.reward_weight"):
        load_config(None, ["objective.reward_weight=-1"])


# ------------------------------------------------------------------ through train()

def fixed_rewards(monkeypatch, pattern):
    """The arithmetic task's rewards replaced by `pattern` (row i gets pattern[i % len]), so groups are known."""
    monkeypatch.setattr(ArithmeticTask, "verify_batch",
                        lambda self, problems, responses: [pattern[i % len(pattern)] for i in range(len(responses))])


def spy_on_opd(monkeypatch):
    seen = []

    def spy(rollouts, student, teacher, cfg):
        seen.append(None if rollouts.reward_advantage_B is None else rollouts.reward_advantage_B.tolist())
        return sampled_token_opd(rollouts, student, teacher, cfg)

    monkeypatch.setitem(OBJECTIVES, "opd", Objective(spy, teacher_request=OBJECTIVES["opd"].teacher_request,
                                                     reward_term=True))
    return seen


def test_training_loop_passes_group_normalised_rewards(model_dirs, tmp_path, monkeypatch):
    pattern = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # 2 prompts x 4 samples
    fixed_rewards(monkeypatch, pattern)
    seen = spy_on_opd(monkeypatch)
    cfg = load_config(None, overrides(model_dirs, tmp_path / "mix", "rollout.samples_per_prompt=4", "train.steps=2",
                                      "objective.reward_weight=1", "train.micro_batch_size=3"))
    train(cfg, progress=False)
    # groups: [1, 0, 0, 1] (mixed) and [1, 1, 0, 0] (mixed); each step's micro-batches of 3 rows, concatenated
    expected = hand_grpo(pattern, 4)
    per_step = [sum(seen[i:i + 3], []) for i in range(0, len(seen), 3)]
    assert len(per_step) == 2 and all(s == pytest.approx(expected, abs=1e-6) for s in per_step)
    for row in metric_rows(tmp_path / "mix"):
        assert row["train/reward_flat_frac"] == 0.0
        assert row["train/reward_group_std"] == pytest.approx(statistics.stdev([1, 0, 0, 1]))
        assert 0 < row["train/reward_share"] < 1


def test_reward_only_run_moves_weights_only_where_rewards_differ(model_dirs, tmp_path, monkeypatch):
    base = ["rollout.samples_per_prompt=2", "train.steps=2", "objective.reward_weight=1", "objective.kl_coef=0"]
    fixed_rewards(monkeypatch, [1.0, 1.0])  # every group flat: no signal, so Adam's update is exactly 0
    train(load_config(None, overrides(model_dirs, tmp_path / "flat", *base)), progress=False)
    assert max_diff(weights(tmp_path / "flat", 2), init_weights(model_dirs)) == 0.0
    rows = metric_rows(tmp_path / "flat")
    assert all(r["train/reward_flat_frac"] == 1.0 and r["train/reward_group_std"] == 0.0 for r in rows)
    fixed_rewards(monkeypatch, [1.0, 0.0])
    train(load_config(None, overrides(model_dirs, tmp_path / "mixed", *base)), progress=False)
    assert max_diff(weights(tmp_path / "mixed", 2), init_weights(model_dirs)) > 1e-5
    assert all(r["train/reward_share"] == pytest.approx(1.0) for r in metric_rows(tmp_path / "mixed"))


def test_weight_zero_run_logs_the_group_metrics_as_a_null(model_dirs, tmp_path, monkeypatch):
    fixed_rewards(monkeypatch, [1.0, 0.0])
    seen = spy_on_opd(monkeypatch)
    train(load_config(None, overrides(model_dirs, tmp_path / "w0", "train.steps=1")), progress=False)
    assert seen == [None]  # no reward term: the objective gets no advantages
    (row,) = metric_rows(tmp_path / "w0")
    assert row["train/reward_flat_frac"] == 0.0 and "train/reward_share" not in row
