"""Gradient alignment diagnostics (opdlab.diagnostics.alignment.run*): V_j against exact enumeration on a model small
enough to enumerate, g* and cosines against hand computation, the autograd descent directions against their closed
forms, the bootstrap and rank correlation, and the CLI end to end with `opdlab report` redrawing the plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from logit_batches import logit_batch
from opdlab.config import ConfigError, ObjectiveConfig, load_config
from opdlab.diagnostics.alignment.config import AlignmentConfig
from opdlab.diagnostics.alignment.report import bootstrap_ci, spearman
from opdlab.diagnostics.alignment.signals import cosine, descent_directions, exponential_depths, ideal_gradient, \
    select_nodes
from opdlab.diagnostics.alignment.targeted import success_values
from opdlab.objectives import OBJECTIVES
from opdlab.tasks.base import Task
from opdlab.types import ObjectiveOutput, Problem

# ------------------------------------------------------------------ V_j against exact enumeration (tiny vocabulary)

TINY_VOCAB = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=TINY_VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


class SubstringTask(Task):
    """Success iff the response contains 'ab' or ends in 'cc'."""

    def problems(self, split):
        return [Problem(uid="p0", question="q", answer="")]

    def verify(self, problem, response):
        return float("ab" in response or response.endswith("cc"))


def exact_success(model, tokenizer, task, problem, context: list[int], response: list[int], steps_left: int) -> float:
    """P(success) when the student samples up to `steps_left` more tokens after `response`, by enumerating every
    continuation with full (cache-free) forward passes."""
    if response and response[-1] == TINY_VOCAB["<eos>"] or steps_left == 0:
        return task.verify(problem, tokenizer.decode(response, skip_special_tokens=True))
    with torch.no_grad():
        p_V = F.softmax(model(torch.tensor([context + response])).logits[0, -1].double(), -1)
    return sum(float(p_V[v]) * exact_success(model, tokenizer, task, problem, context, response + [v], steps_left - 1)
               for v in range(len(p_V)))


def test_success_values_match_exact_enumeration():
    tokenizer, task = tiny_tokenizer(), SubstringTask()
    problem = task.problems("test")[0]
    config = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.4, pad_token_id=0,
                         eos_token_id=1)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    prompt, head, horizon, n = [4, 2], [2], 3, 3000  # prompt "ca", completion so far "a", 3 completion tokens in all
    candidates = list(range(5))
    est_C_n = success_values(model, tokenizer, task, problem, torch.tensor(prompt), head, candidates, n,
                             max_new_tokens=horizon, stops=[1], generator=torch.Generator().manual_seed(0))
    exact = np.array([exact_success(model, tokenizer, task, problem, prompt, head + [j], horizon - len(head) - 1)
                      for j in candidates])
    assert 0.01 < exact[[0, 2, 4]].min() and exact[[0, 2, 4]].max() < 0.99  # not decided by 0/1 values alone
    assert exact[3] == pytest.approx(1.0) and exact[1] == 0.0  # forcing 'b' completes 'ab'; forcing EOS ends at "a"
    est = est_C_n.mean(1)
    se = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(est - exact) <= 4.5 * se + 1e-12), (est, exact)
    # P_succ over the whole vocabulary is the node's success probability with nothing forced
    with torch.no_grad():
        p_V = F.softmax(model(torch.tensor([prompt + head])).logits[0, -1].double(), -1).numpy()
    p_succ, g_star = ideal_gradient(p_V, exact)
    node = exact_success(model, tokenizer, task, problem, prompt, head, horizon - len(head))
    assert p_succ == pytest.approx(node, abs=1e-12)
    assert cosine(ideal_gradient(p_V, est)[1], g_star) > 0.97


# -------------------------------------------------------------------------------- g*, cosine, depths, selection

def test_ideal_gradient_and_cosine_by_hand():
    p_succ, g = ideal_gradient([0.5, 0.3, 0.2], [1.0, 0.0, 0.5])
    assert p_succ == pytest.approx(0.6)
    np.testing.assert_allclose(g, [0.2, -0.18, -0.02], atol=1e-12)
    # renormalised on the candidate set: a candidate set holding half the mass gives the same vector
    np.testing.assert_allclose(ideal_gradient([0.25, 0.15, 0.1], [1.0, 0.0, 0.5])[1], g, atol=1e-12)
    # g* is dP_succ/dz
    z = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    V = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((z.softmax(-1) * V).sum(), z)
    np.testing.assert_allclose(ideal_gradient(z.detach().softmax(-1).numpy(), V.numpy())[1], grad.numpy(), atol=1e-12)
    assert cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([0.2, -0.18, -0.02], [-0.4, 0.36, 0.04]) == pytest.approx(-1.0)
    assert cosine([0.0, 0.0], [1.0, 2.0]) is None  # every candidate equally good: undefined
    assert ideal_gradient([0.6, 0.4], [1.0, 1.0])[1].tolist() == [0.0, 0.0]


def test_exponential_depths_and_budgeted_selection():
    assert exponential_depths(40, 2.0) == [0, 1, 3, 7, 15, 31]
    assert exponential_depths(30, 1.5) == [0, 1, 2, 4, 6, 10, 16, 24]
    with pytest.raises(ValueError, match="ratio"):
        exponential_depths(10, 1.0)
    counts = [[(0, 3), (1, 4), (3, 2)], [(0, 5), (1, 2)]]  # (position, |C|) per rollout
    # n = 2: level 0 costs 6 + 10, level 1 costs 8 + 4, rollout 0's level 2 costs 4
    assert select_nodes(counts, budget=16, per_candidate=2) == [(0, 0), (1, 0)]
    assert select_nodes(counts, budget=24, per_candidate=2) == [(0, 0), (0, 1), (1, 0)]
    assert select_nodes(counts, budget=100, per_candidate=2) == [(0, 0), (0, 1), (0, 3), (1, 0), (1, 1)]
    assert select_nodes(counts, budget=100, per_candidate=2, max_nodes_per_rollout=1) == [(0, 0), (1, 0)]


# ------------------------------------------------------------- descent directions by autograd vs closed forms

def _batch():
    batch = logit_batch(seed=5, B=2, T=5, V=11, lengths=[5, 3])
    rollouts, _, teacher = batch.inputs(top_k=4)
    z = batch.z_B_T_V.detach()
    mask = rollouts.loss_mask_B_T.bool()
    return rollouts, teacher, z, mask, F.log_softmax(z, -1), F.log_softmax(batch.zt_B_T_V, -1)


def test_direction_of_sampled_token_opd_is_advantage_times_score():
    rollouts, teacher, z, mask, logp, logq = _batch()
    d = descent_directions(OBJECTIVES["opd"], rollouts, z, teacher, ObjectiveConfig(name="opd", support_k=4))
    y = rollouts.completion_ids_B_T
    advantage = -(rollouts.logp_old_B_T - logq.gather(-1, y[..., None]).squeeze(-1))
    ratio = torch.exp(logp.gather(-1, y[..., None]).squeeze(-1) - rollouts.logp_old_B_T)
    expected = (advantage * ratio)[..., None] * (F.one_hot(y, 11) - logp.exp()) / mask.sum()
    torch.testing.assert_close(d[mask], expected[mask], atol=1e-6, rtol=1e-5)
    assert d[~mask].abs().max() == 0


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
def test_direction_of_full_kl_matches_closed_form(name):
    rollouts, teacher, z, mask, logp, logq = _batch()
    d = descent_directions(OBJECTIVES[name], rollouts, z, teacher, ObjectiveConfig(name=name, support_k=4))
    p, q = logp.exp(), logq.exp()
    if name == "reverse_kl":  # -dKL(p||q)/dz_j = p_j (f_j - E_p f), f = log q - log p
        f = logq - logp
        expected = p * (f - (p * f).sum(-1, keepdim=True))
    else:  # -dKL(q||p)/dz = q - p
        expected = q - p
    torch.testing.assert_close(d[mask], expected[mask] / mask.sum(), atol=1e-6, rtol=1e-5)


def test_direction_of_any_table_entry(monkeypatch):
    """A new objective works as soon as it is in the table: here the plain log-likelihood of the sampled token."""
    def likelihood(rollouts, student, teacher, cfg):
        return ObjectiveOutput(loss=-(student.logp_B_T * rollouts.loss_mask_B_T).sum(), metrics={})

    monkeypatch.setitem(OBJECTIVES, "likelihood", likelihood)
    rollouts, teacher, z, mask, logp, _ = _batch()
    d = descent_directions(OBJECTIVES["likelihood"], rollouts, z, teacher, ObjectiveConfig(support_k=4))
    expected = F.one_hot(rollouts.completion_ids_B_T, 11) - logp.exp()
    torch.testing.assert_close(d[mask], expected[mask], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- bootstrap, rank correlation

def test_bootstrap_interval_covers_and_respects_clusters():
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        x = rng.normal(1.0, 2.0, size=40)
        ci = bootstrap_ci(x, n_boot=400, seed=rep)
        covered += ci["lo"] <= 1.0 <= ci["hi"]
        assert ci["mean"] == pytest.approx(x.mean())
    assert 0.88 <= covered / 200 <= 0.99
    # 30 clusters of 5 identical values carry the information of 30 values, not 150
    x = rng.normal(size=30)
    repeated, labels = np.repeat(x, 5), np.repeat(np.arange(30), 5)
    naive = bootstrap_ci(repeated, n_boot=4000)
    clustered = bootstrap_ci(repeated, labels, n_boot=4000)
    ratio = (clustered["hi"] - clustered["lo"]) / (naive["hi"] - naive["lo"])
    assert ratio == pytest.approx(math.sqrt(5), rel=0.2)
    normal = 2 * 1.96 * x.std() / math.sqrt(30)
    assert clustered["hi"] - clustered["lo"] == pytest.approx(normal, rel=0.2)


def test_spearman_by_hand_with_ties():
    # ranks of y = [5, 6, 7, 8, 7] are [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    x = np.random.default_rng(1).normal(size=20)
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman([1, 2], [3, 4]) is None


# ------------------------------------------------------------------------------------------- config errors

def test_bad_teacher_spec_and_signal_are_named():
    with pytest.raises(ConfigError, match=r"teachers.*'self\+oracle'.*VIEW"):
        load_config(None, ["teachers=[teacher,self+oracle]"], AlignmentConfig)
    with pytest.raises(ConfigError, match=r"signals.*'kl'.*allowed"):
        load_config(None, ["signals=[opd,kl]"], AlignmentConfig)


# ------------------------------------------------------------------------- the CLI end to end, report redraws

@pytest.fixture(scope="module")
def builtin_pair(tmp_path_factory):
    """The built-in student and teacher architectures: the student warm-started briefly on the first two test
    questions' worked solutions (so its rollouts are sometimes right), the teacher left random."""
    from opdlab.models.loading import build_char_tokenizer, init_builtin_model
    from opdlab.models.prompts import render_prompt
    from opdlab.tasks import ArithmeticTask

    tokenizer = build_char_tokenizer()
    root = tmp_path_factory.mktemp("alignment_models")
    student = init_builtin_model("student", tokenizer, seed=0)
    problems = ArithmeticTask(2, 3, max_value=19).problems("test")[:2]
    texts = [render_prompt(tokenizer, p.question) + p.solution + tokenizer.eos_token for p in problems]
    ids = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        student(**ids, labels=labels).loss.backward()
        optimizer.step()
    dirs = {"student": student, "teacher": init_builtin_model("teacher", tokenizer, seed=1)}
    for name, model in dirs.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_cli_end_to_end_and_report_redraws(builtin_pair, tmp_path):
    from opdlab.cli import main

    run_dir = tmp_path / "align"
    rc = main(["diagnose", "alignment", f"student.path={builtin_pair / 'student'}",
               f"teacher.path={builtin_pair / 'teacher'}", "num_questions=2", "samples_per_question=2",
               "max_new_tokens=48", "rollouts_per_candidate=3", "budget=400", "student_top_k=2", "teacher_top_k=2",
               "teachers=[teacher,self+partial]", "signals=[opd,reverse_kl,lsm]", "param_subset=lm_head",
               "bootstrap=200", f"run_dir={run_dir}"])
    assert rc == 0
    result = json.loads((run_dir / "alignment.json").read_text())
    assert result["nodes"] and result["timing"]["targeted_rollouts"] <= 400
    defined = 0
    for node in result["nodes"]:
        assert node["position"] in exponential_depths(result["rollouts"][node["rollout"]]["length"], 2.0)
        assert len(node["V"]) == len(node["candidates"]) and all(0 <= v <= 1 for v in node["V"])
        np.testing.assert_allclose(node["g_star"], ideal_gradient(node["p"], node["V"])[1], atol=1e-12)
        for teacher in ("teacher", "self+partial"):
            for signal, entry in node["teachers"][teacher]["signals"].items():
                assert entry["alignment"] == cosine(node["g_star"], entry["direction"])
                if entry["alignment"] is not None:
                    defined += 1
                    # through the output layer alone, J^T v = v (x) h, so the parameter-space cosine is the same
                    assert entry["param_alignment"] == pytest.approx(entry["alignment"], abs=1e-6)
    assert defined > 0
    groups = result["summary"]["groups"]
    assert len(groups) == 6 and all(g["defined"] <= g["nodes"] for g in groups)
    pngs = sorted(run_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["alignment_by_teacher.png", "alignment_positions.png", "alignment_vs_kl.png"]
    before = (run_dir / "alignment.json").read_bytes()
    for p in pngs:
        p.unlink()
    assert main(["report", str(run_dir)]) == 0
    assert sorted(run_dir.glob("*.png")) == pngs and all(p.stat().st_size > 10_000 for p in pngs)
    assert (run_dir / "alignment.json").read_bytes() == before


def test_missing_oracle_trace_is_reported_before_sampling(model_dirs, tmp_path, monkeypatch):
    """A view that needs Problem.solution on a task without one fails at once, naming the problem."""
    from opdlab.diagnostics.alignment.run import run_alignment

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cfg = load_config(None, [f"student.path={model_dirs['student']}", f"teacher.path={model_dirs['teacher']}",
                             "task.name=file", f"task.file.train_path={data}", f"task.file.test_path={data}",
                             "task.file.solution_field=null",
                             "num_questions=1", "teachers=[teacher,self+full]", f"run_dir={tmp_path / 'x'}"],
                      AlignmentConfig)
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the oracle traces")

    monkeypatch.setattr("opdlab.diagnostics.alignment.run.sample", no_sampling)
    with pytest.raises(ValueError, match="full teacher view needs an oracle trace.*has no worked solution"):
        run_alignment(cfg, progress=False)


def test_strata_by_p_succ_and_up_to_the_first_error():
    """Each cell's mean and node count against a direct computation on hand-made nodes; the composition effect:
    incorrect rollouts align better within every stratum, yet worse overall, because they hold the low-P_succ
    nodes."""
    from opdlab.diagnostics.alignment.nodes import before_first_error
    from opdlab.diagnostics.alignment.report import p_succ_table, summarise

    assert before_first_error("7 + 5\n= 12", "7 + 5\n= 1") is True
    assert before_first_error("7 + 5\n= 12", "7 + 6") is False and before_first_error(None, "x") is None
    rng = np.random.default_rng(0)
    rollouts, nodes = [], []
    for ri in range(40):
        correct = ri % 2 == 0
        rollouts.append({"index": ri, "question_uid": f"q{ri % 5}", "correct": correct})
        for t in range(6):
            before = t < (6 if correct else 2)
            p_succ = float(rng.uniform(0.6, 1.0) if before else rng.uniform(0.0, 0.2))
            align = (0.5 if p_succ >= 0.6 else -0.4) + (0.1 if not correct else 0.0)
            nodes.append({"rollout": ri, "position": t, "p_succ": p_succ, "informative": True, "before_error": before,
                          "teachers": {"teacher": {"kl_student_teacher": 0.1, "kl_teacher_student": 0.1, "js": 0.1,
                                                   "signals": {"opd": {"alignment": align}}}}})
    result = {"teachers": ["teacher"], "signals": ["opd"], "rollouts": rollouts, "nodes": nodes,
              "config": {}, "timing": {}}
    g = summarise(result, n_boot=200)["groups"][0]
    assert g["incorrect_minus_correct"]["mean"] < 0  # overall: incorrect rollouts look worse
    for cell in [*g["by_p_succ"], g["before_first_error"]]:
        if cell["correct"]["n"] and cell["incorrect"]["n"]:
            assert cell["incorrect_minus_correct"]["mean"] == pytest.approx(0.1)  # within strata: better
    lo_bin, _, hi_bin = g["by_p_succ"]
    assert lo_bin["correct"]["n"] == 0 and lo_bin["incorrect"]["n"] == 20 * 4
    assert hi_bin["correct"]["n"] == 20 * 6 and hi_bin["incorrect"]["n"] == 20 * 2
    assert g["before_first_error"]["correct"]["n"] == 120 and g["before_first_error"]["incorrect"]["n"] == 40
    result["summary"] = summarise(result, n_boot=200)
    assert p_succ_table(result).columns[-1].header == "up to the first error"
