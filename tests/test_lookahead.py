"""The lookahead objective (LGR, `opdlab.objectives.lookahead`) and its teacher seam (`score(..., lookahead=...)`).

Hand-made tensors check the group normalisation, the advantage, both forms' losses and gradients and the metrics
against an independent plain-Python computation; the seam is checked against naive per-candidate teacher forwards;
short `train()` runs on the built-in model architectures check that the objective trains through the real loop,
that it reduces to `opd` exactly when nothing triggers, and that it composes with top-p and special-token masking.

    python -m pytest tests/test_lookahead.py -q
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from opdlab.config import ConfigError, load_config
from opdlab.models.loading import build_char_tokenizer, init_builtin_model
from opdlab.objectives import OBJECTIVES
from opdlab.objectives.lookahead import EPS, group_normalise
from opdlab.teacher.scoring import score
from opdlab.train import train
from opdlab.teacher.tree_attention import lookahead_scores
from opdlab.types import LookaheadRequest, Problem, Rollouts, StudentOutputs, TeacherScores
from test_train import max_diff, metric_rows, weights

torch.set_num_threads(1)

# ------------------------------------------------------------------ hand-made batch: B = 2, T = 4, K = 3, V = 6
Y = [[1, 4, 2, 0], [5, 3, 3, 0]]                          # sampled tokens
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]                       # completion mask (row 1 has 3 tokens)
LOSS = [[1, 1, 0, 1], [1, 1, 1, 0]]                       # loss mask: (0, 2) is a masked special token
TRIGGER = [[1, 1, 1, 0], [1, 0, 1, 0]]                    # (0, 2) triggers but is masked: it must not count
CANDIDATES = [[[1, 2, 3], [0, 2, 3], [2, 1, 0], [0, 1, 2]],
              [[4, 5, 0], [1, 2, 3], [3, 0, 1], [0, 1, 2]]]
REWARD = [[[0.9, 0.5, 0.1], [0.3, 0.3, 0.9], [0.7, 0.2, 0.6], [0, 0, 0]],
          [[0.4, 0.4, 0.4], [0, 0, 0], [0.2, 0.8, 0.5], [0, 0, 0]]]
LOGP_OLD = [[-0.5, -1.2, -0.3, -2.0], [-0.7, -0.9, -1.1, 0.0]]
LOGP_T = [[-0.4, -2.0, -0.8, -0.1], [-1.5, -0.2, -0.6, 0.0]]
LOGP_NEW = [[-0.45, -1.0, -0.35, -1.9], [-0.8, -1.0, -1.0, 0.0]]


def hand_made(H: int = 5, V: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 4
    rollouts = Rollouts(
        prompt_ids_B_P=torch.ones(B, 2, dtype=torch.long), prompt_mask_B_P=torch.ones(B, 2, dtype=torch.long),
        completion_ids_B_T=torch.tensor(Y), completion_mask_B_T=torch.tensor(MASK),
        logp_old_B_T=torch.tensor(LOGP_OLD), sampler_logp_B_T=torch.tensor(LOGP_OLD),
        problems=[Problem("a", "q", "1")] * B, texts=["", ""], loss_mask_B_T=torch.tensor(LOSS))
    teacher = TeacherScores(
        logp_B_T=torch.tensor(LOGP_T), topk_ids_B_T_K=torch.zeros(B, T, 0, dtype=torch.long),
        topk_logp_B_T_K=torch.zeros(B, T, 0), entropy_B_T=torch.zeros(B, T), maxp_B_T=torch.ones(B, T),
        lookahead_trigger_B_T=torch.tensor(TRIGGER).bool(), lookahead_ids_B_T_K=torch.tensor(CANDIDATES),
        lookahead_reward_B_T_K=torch.tensor(REWARD) * torch.tensor(TRIGGER)[..., None])
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, H, generator=g))
    student = StudentOutputs(
        logp_B_T=torch.tensor(LOGP_NEW, requires_grad=True), entropy_B_T=torch.zeros(B, T),
        hidden_B_T_H=torch.randn(B, T, H, generator=g).requires_grad_(), lm_head=lm_head, vocab_size=V,
        chunk_size=2)
    return rollouts, student, teacher


def reference(gamma: float, form: str, lm_head, hidden):
    """Plain-Python LGR (docs/methods.md#lookahead-group-reward-lgr) on the hand-made batch: loss (a torch scalar built
    from scalars, for gradients) and the metrics."""
    n = sum(map(sum, LOSS))
    loss, opd_size, bonus_size = 0.0, 0.0, 0.0
    triggers, in_candidates, rewards, group_stds, sampled_norm = 0, 0, [], [], []
    for b in range(2):
        for t in range(4):
            if not LOSS[b][t]:
                continue
            opd_adv = -(LOGP_OLD[b][t] - LOGP_T[b][t])
            bonus, candidate_term = 0.0, 0.0
            if TRIGGER[b][t]:
                r = REWARD[b][t]
                mean = sum(r) / 3
                std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
                norm = [(x - mean) / (std + EPS) for x in r]
                triggers += 1
                rewards += r
                group_stds.append(std)
                if Y[b][t] in CANDIDATES[b][t]:
                    in_candidates += 1
                    sampled_norm.append(norm[CANDIDATES[b][t].index(Y[b][t])])
                    bonus = gamma * sampled_norm[-1] if form == "sampled" else 0.0
                if form == "topk":
                    logp_V = torch.log_softmax(lm_head(hidden[b, t]), -1)
                    candidate_term = -gamma * sum(norm[k] * logp_V[CANDIDATES[b][t][k]] for k in range(3))
                    bonus_size += gamma * sum(abs(x) for x in norm)
            ratio = math.exp(LOGP_NEW[b][t] - LOGP_OLD[b][t])
            loss = loss - ratio * (opd_adv + bonus) + candidate_term
            opd_size += abs(opd_adv)
            bonus_size += abs(bonus)
    metrics = {"lookahead/trigger_rate": triggers / n, "lookahead/reward_mean": statistics.fmean(rewards),
               "lookahead/reward_std": statistics.pstdev(rewards), "lookahead/group_std": statistics.fmean(group_stds),
               "lookahead/sampled_in_candidates": in_candidates / triggers,
               "lookahead/sampled_norm_reward": statistics.fmean(sampled_norm),
               "lookahead/bonus_share": bonus_size / (opd_size + bonus_size)}
    return loss / n, metrics


def test_group_normalise_matches_a_direct_computation():
    r = torch.tensor([[[0.9, 0.5, 0.1], [0.2, 0.2, 0.2]]])
    got = group_normalise(r, torch.tensor([[True, True]]))
    std = math.sqrt(((0.9 - 0.5) ** 2 + 0 + (0.1 - 0.5) ** 2) / 3)
    expected = [[(0.9 - 0.5) / (std + EPS), 0.0, (0.1 - 0.5) / (std + EPS)], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(got[0], torch.tensor(expected))
    assert torch.all(group_normalise(r, torch.tensor([[False, True]]))[0, 0] == 0)


def test_floored_normalisations_match_a_direct_computation():
    r = torch.tensor([[[0.9, 0.5, 0.1], [0.991, 0.990, 0.9905]]])  # a spread group and a noise-level one
    trig = torch.tensor([[True, True]])
    std = r.double().std(-1, correction=0)
    centred = r.double() - r.double().mean(-1, keepdim=True)
    floor = 0.05
    assert std[0, 0] > floor > std[0, 1]
    torch.testing.assert_close(group_normalise(r, trig, norm="floor", floor=floor).double(),
                               centred / std.clamp(min=floor)[..., None], atol=1e-6, rtol=1e-5)
    gate = group_normalise(r, trig, norm="gate", floor=floor)
    torch.testing.assert_close(gate[0, 0].double(), centred[0, 0] / (std[0, 0] + EPS), atol=1e-6, rtol=1e-5)
    assert torch.all(gate[0, 1] == 0)
    plain = group_normalise(r, trig)
    assert plain[0, 1].abs().max() > 1.0  # the paper's form blows a 4e-4 spread up to unit scale
    assert group_normalise(r, trig, norm="floor", floor=floor)[0, 1].abs().max() < 0.02
    with pytest.raises(ValueError, match="unknown group normalisation 'z'"):
        group_normalise(r, trig, norm="z")


def test_objective_uses_the_configured_normalisation():
    rollouts, student, teacher = hand_made()
    outs = {}
    for norm in ("std", "gate"):
        cfg = load_config(None, ["objective.name=lookahead", f"objective.lookahead.norm={norm}",
                                 "objective.lookahead.std_floor=1e9"]).objective
        outs[norm] = OBJECTIVES["lookahead"](rollouts, student, teacher, cfg)
    # a floor above every group's std gates every bonus off: the loss is plain OPD's
    opd_cfg = load_config(None, ["objective.name=opd"]).objective
    opd = OBJECTIVES["opd"](rollouts, student, teacher, opd_cfg)
    assert outs["gate"].loss.item() == pytest.approx(opd.loss.item(), abs=1e-6)
    assert outs["std"].loss.item() != pytest.approx(opd.loss.item(), abs=1e-6)


@pytest.mark.parametrize("form, gamma", [("sampled", 1.0), ("sampled", 2.5), ("topk", 1.0), ("topk", 0.5)])
def test_loss_gradients_and_metrics_match_an_independent_computation(form, gamma):
    rollouts, student, teacher = hand_made()
    cfg = load_config(None, ["objective.name=lookahead", f"objective.lookahead.form={form}",
                             f"objective.lookahead.gamma={gamma}", "objective.lookahead.norm=std"]).objective
    out = OBJECTIVES["lookahead"](rollouts, student, teacher, cfg)
    out.loss.backward()
    hidden = student.hidden_B_T_H.detach().clone().requires_grad_()
    lm_head = torch.nn.Linear(5, 6, bias=False)
    lm_head.weight.data.copy_(student.lm_head.weight.data)
    ref_loss, ref_metrics = reference(gamma, form, lm_head, hidden)
    assert out.loss.item() == pytest.approx(float(ref_loss.detach() if form == "topk" else ref_loss), abs=1e-6)
    ratio = torch.exp(torch.tensor(LOGP_NEW) - torch.tensor(LOGP_OLD))
    # d loss / d log pi_theta(y_t) = -ratio_t * A_t / n on loss tokens, 0 elsewhere
    trigger = teacher.lookahead_trigger_B_T & rollouts.loss_mask_B_T.bool()
    norm = group_normalise(teacher.lookahead_reward_B_T_K, trigger)
    n = sum(map(sum, LOSS))
    for b in range(2):
        for t in range(4):
            adv = -(LOGP_OLD[b][t] - LOGP_T[b][t])
            if form == "sampled" and TRIGGER[b][t] and LOSS[b][t] and Y[b][t] in CANDIDATES[b][t]:
                adv += gamma * norm[b, t, CANDIDATES[b][t].index(Y[b][t])].item()
            expected = -ratio[b, t].item() * adv / n if LOSS[b][t] else 0.0
            assert student.logp_B_T.grad[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)
    if form == "topk":  # gradients of the candidate term reach the hidden states and the output layer
        ref_loss.backward()
        torch.testing.assert_close(student.hidden_B_T_H.grad, hidden.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student.lm_head.weight.grad, lm_head.weight.grad, rtol=1e-5, atol=1e-6)
    else:
        assert student.hidden_B_T_H.grad is None or not student.hidden_B_T_H.grad.any()
    for k, v in ref_metrics.items():
        assert out.metrics[k] == pytest.approx(v, abs=1e-5), k


def test_missing_candidate_rewards_is_a_clear_error():
    rollouts, student, teacher = hand_made()
    teacher.lookahead_reward_B_T_K = None
    with pytest.raises(ValueError, match="needs candidate rewards"):
        OBJECTIVES["lookahead"](rollouts, student, teacher, load_config(None, ["objective.name=lookahead"]).objective)


# ------------------------------------------------------------------ the seam: score(..., lookahead=...)


def builtin_pair(seed: int = 0):
    tokenizer = build_char_tokenizer()
    student = init_builtin_model("student", tokenizer, seed=seed).eval()
    teacher = init_builtin_model("teacher", tokenizer, seed=seed + 1).eval()
    with torch.no_grad():  # a peakier student than the random init, so entropies vary around tau
        student.get_output_embeddings().weight.mul_(20)
        teacher.get_output_embeddings().weight.mul_(40)
    return tokenizer, student, teacher


def test_score_with_lookahead_equals_plain_scores_and_naive_candidate_rewards():
    from opdlab.rollout.builtin import sample
    tokenizer, student, teacher = builtin_pair()
    V = len(tokenizer)
    problems = [Problem(str(i), q, "0") for i, q in enumerate(["Compute 1 + 2.", "Compute 12 - 5 + 6.", "Hi"])]
    rollouts = sample(student, tokenizer, problems, max_new_tokens=10, generator=torch.Generator().manual_seed(0),
                      vocab_size=V)
    plain = score(teacher, rollouts, V, top_k=4, chunk_size=7)
    request = LookaheadRequest(k=3, tau=1.5, signal="max_p", segment_len=4)
    la = score(teacher, rollouts, V, top_k=4, chunk_size=7, lookahead=request, student=student)
    m = rollouts.completion_mask_B_T.bool()
    for name in ("logp_B_T", "entropy_B_T", "maxp_B_T", "topk_logp_B_T_K"):
        torch.testing.assert_close(getattr(la, name)[m], getattr(plain, name)[m], rtol=1e-5, atol=1e-5)
    trigger = la.lookahead_trigger_B_T
    assert 0 < trigger.sum() < m.sum(), "the case should trigger at some positions only"
    for b, t in trigger.nonzero().tolist():
        prefix = torch.cat([rollouts.prompt_ids_B_P[b][rollouts.prompt_mask_B_P[b].bool()],
                            rollouts.completion_ids_B_T[b, :t]])
        with torch.no_grad():
            s_logp = F.log_softmax(student(input_ids=prefix[None]).logits[0, -1, :V], -1)
        assert set(la.lookahead_ids_B_T_K[b, t].tolist()) == set(s_logp.topk(3).indices.tolist())
        for k, v in enumerate(la.lookahead_ids_B_T_K[b, t].tolist()):
            with torch.no_grad():
                p = teacher(input_ids=torch.cat([prefix, torch.tensor([v])])[None]).logits[0, -1, :V].softmax(-1)
            assert la.lookahead_reward_B_T_K[b, t, k].item() == pytest.approx(p.max().item(), abs=1e-5)
    assert torch.all(la.lookahead_reward_B_T_K[~trigger] == 0)
    with pytest.raises(ValueError, match="needs the student"):
        score(teacher, rollouts, V, lookahead=request)
    with pytest.raises(ValueError, match="needs the teacher model in this process"):  # e.g. a teacher over HTTP
        lookahead_scores(object(), student, rollouts, rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P, request, V)


# ------------------------------------------------------------------ end to end through train()


@pytest.fixture(scope="module")
def builtin_dirs(tmp_path_factory):
    tokenizer, student, teacher = builtin_pair()
    root = tmp_path_factory.mktemp("builtin_arch")
    dirs = {}
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def initial_weights(dirs):
    from safetensors.torch import load_file
    return load_file(dirs["student"] / "model.safetensors")


def run(dirs, run_dir, *extra):
    cfg = load_config(None, [
        f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}", "device=cpu",
        "task.arithmetic.max_steps=2", "task.test_size=8", "rollout.prompts_per_step=3", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "train.steps=2", "train.save_every=2", "train.sample_every=100",
        "train.lr=1e-3", "scoring.chunk_size=5", "objective.support_k=4", "train.precision=fp32", f"run_dir={run_dir}",
        *extra])
    train(cfg, progress=False)
    return metric_rows(run_dir)


def test_lookahead_trains_logs_its_metrics_and_reduces_to_opd(builtin_dirs, tmp_path):
    rows = run(builtin_dirs, tmp_path / "lgr", "objective.name=lookahead", "objective.lookahead.tau=1.5",
               "objective.lookahead.k=4", "objective.lookahead.segment=5", "train.micro_batch_size=4")
    for r in rows:
        for key in ("lookahead/trigger_rate", "lookahead/reward_mean", "lookahead/reward_std",
                    "lookahead/sampled_in_candidates", "lookahead/bonus_share", "train/reverse_kl"):
            assert key in r and math.isfinite(r[key]), key
        assert 0 < r["lookahead/trigger_rate"] < 1 and 0 < r["lookahead/bonus_share"] < 1
        assert 0 < r["lookahead/reward_mean"] <= 1  # max-p
    lgr = weights(tmp_path / "lgr", 2)
    assert max_diff(lgr, initial_weights(builtin_dirs)) > 1e-5
    run(builtin_dirs, tmp_path / "opd", "objective.name=opd", "train.micro_batch_size=4")
    opd = weights(tmp_path / "opd", 2)
    assert max_diff(lgr, opd) > 1e-3  # the bonus changed the update
    # no trigger (tau above log V) or gamma = 0: the same update as opd (up to the tree passes' fp32 rounding of the
    # teacher's log-probs, ~1e-6, which two Adam steps turn into < 1e-4)
    for extra in ("objective.lookahead.tau=50", "objective.lookahead.gamma=0"):
        name = extra.split("=")[0].split(".")[-1]
        rows = run(builtin_dirs, tmp_path / name, "objective.name=lookahead", "objective.lookahead.tau=1.5",
                   "train.micro_batch_size=4", extra)
        assert max_diff(weights(tmp_path / name, 2), opd) < 1e-4, extra
        for r in rows:
            assert r["lookahead/bonus_share"] == 0
            if name == "tau":
                assert r["lookahead/trigger_rate"] == 0 and "lookahead/reward_mean" not in r
            else:
                assert r["lookahead/trigger_rate"] > 0


def test_topk_form_with_top_p_and_masked_tokens(builtin_dirs, tmp_path):
    rows = run(builtin_dirs, tmp_path / "topk", "objective.name=lookahead", "objective.lookahead.form=topk",
               "objective.lookahead.tau=1.5", "objective.lookahead.signal=neg_entropy", "rollout.top_p=0.9",
               "objective.mask_tokens=[" + ", ".join(repr(c) for c in "0123456789abcdefghijklmnopqrst") + "]",
               "train.lr=1e-4")
    assert any(r["train/masked_frac"] > 0 for r in rows)
    for r in rows:
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        assert r["lookahead/reward_mean"] < 0 and r["lookahead/trigger_rate"] > 0  # rewards: negative entropies
    assert max_diff(weights(tmp_path / "topk", 2), initial_weights(builtin_dirs)) > 1e-5


@pytest.mark.parametrize("override, allowed", [
    ("objective.lookahead.signal=maxp", "max_p"), ("objective.lookahead.form=all", "topk"),
    ("objective.lookahead.k=0", "greater than or equal to 1"), ("objective.lookahead.tau=-1", "greater than or"),
    ("objective.lookahead.segment=0", "greater than or equal to 1")])
def test_bad_lookahead_values_name_the_field(override, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    field, value = override.split("=")
    assert field in str(err.value) and value in str(err.value) and allowed in str(err.value)
