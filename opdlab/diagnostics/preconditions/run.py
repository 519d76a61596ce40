"""`opdlab diagnose`: is each phenomenon the methods address present for this pair and task? Training-free.

    opdlab diagnose --pair builtin                   # the character pair on its task, about a minute
    opdlab diagnose --pair smollm2                   # the SmolLM2 pair on the words task, a few minutes on CPU
    opdlab diagnose checks=[lgr] lgr_nodes=64 ...    # any field (`opdlab diagnose --help`)

The lgr, privileged and alignment checks use the same student rollouts (`num_questions` x `samples_per_question`);
sfd samples its own student and teacher rollouts on the same questions. Per check, the figures, each
with a `confidence` interval from a bootstrap over rollouts (or questions), and a verdict:

    sfd         fidelity decay (`sfd.py`): present when the student's F decay exceeds the teacher's own and the
                teacher's accuracy from cut student prefixes falls from the first cut to the last (both intervals
                above 0)
    lgr         informative lookahead rewards (`lgr.py`): present when mean Spearman(r(k), V_k) over trigger nodes
                has its interval above 0; also the top-reward hit rate against chance and the normalisations compared
    privileged  an informative trace (`privileged.py`): present when the full or the partial trace raises the
                teacher's greedy accuracy (interval above 0); also KL(q_F || q_P) and the answer mass before it is
                written
    alignment   nodes per P_succ bin (`alignment.py`): 'enough' when every (bin, correct / incorrect) cell holds
                `alignment_min_nodes` nodes, else 'too few'

It prints one table and writes OUTPUT/diagnose.json (every figure and the config).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from tqdm.auto import tqdm

from opdlab.config import FidelityConfig
from opdlab.diagnostics.fidelity.measure import measure_fidelity
from opdlab.diagnostics.preconditions.alignment import p_succ_nodes, summarise_alignment
from opdlab.diagnostics.preconditions.config import PreconditionsConfig
from opdlab.diagnostics.preconditions.lgr import lgr_nodes, summarise_lgr
from opdlab.diagnostics.preconditions.privileged import rollout_shift, summarise_privileged, trace_accuracy
from opdlab.diagnostics.preconditions.sfd import summarise_sfd
from opdlab.diagnostics.preconditions.stats import above
from opdlab.models.loading import check_compatible, load_model
from opdlab.models.prompts import stop_token_ids
from opdlab.rollout.builtin import sample
from opdlab.tasks import make_task

CONFIG = PreconditionsConfig


def _rollouts(cfg, student, tokenizer, problems, vocab_size, generator, progress: bool = True):
    """One-row rollouts of the student, cut to their own length."""
    rows = []
    for start in tqdm(range(0, len(problems), cfg.batch_size), desc="student rollouts", disable=not progress,
                      leave=False):
        part = sample(student, tokenizer, problems[start:start + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, generator=generator, vocab_size=vocab_size)
        for i in range(len(part.problems)):
            one = part.select([i])
            L = int(one.completion_mask_B_T.sum())
            rows.append(replace(one, **{k: getattr(one, k)[:, :L] for k in (
                "completion_ids_B_T", "completion_mask_B_T", "logp_old_B_T", "sampler_logp_B_T", "loss_mask_B_T")}))
    return rows


def verdicts(summary: dict, cfg: PreconditionsConfig) -> dict[str, str]:
    out = {}
    if "sfd" in summary:
        s = summary["sfd"]
        decays, drops = above(s.get("excess_decay") or {}), above(s["continuation_drop"])
        out["sfd"] = "present" if decays and drops else ("partly (F decays)" if decays else
                                                        "partly (continuations fall)" if drops else "absent")
    if "lgr" in summary:
        out["lgr"] = "present" if above(summary["lgr"]["spearman"]) else "absent"
    if "privileged" in summary:
        p = summary["privileged"]
        out["privileged"] = "present" if above(p["gain_full"]) or above(p["gain_partial"]) else "absent"
    if "alignment" in summary:
        out["alignment"] = "enough" if summary["alignment"]["min_cell"] >= cfg.alignment_min_nodes else "too few"
    return out


def run_preconditions(cfg: PreconditionsConfig, console=None, progress: bool = True) -> dict:
    console = console or Console()
    t0 = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    student, tokenizer = load_model(cfg.student, device)
    teacher, teacher_tok = load_model(cfg.teacher, device)
    vocab_size = check_compatible(student, tokenizer, teacher, teacher_tok).vocab_size
    privileged_teacher = teacher
    if "privileged" in cfg.checks and cfg.privileged_teacher is not None:
        privileged_teacher, priv_tok = load_model(cfg.privileged_teacher, device)
        check_compatible(student, tokenizer, privileged_teacher, priv_tok)
    task = make_task(cfg.task)
    split = task.problems(cfg.split)
    if len(split) < cfg.num_questions:
        raise ValueError(f"num_questions={cfg.num_questions} but the {cfg.split} split of task {cfg.task.name!r} "
                         f"holds {len(split)} problems")
    questions = [split[i] for i in range(cfg.num_questions)]
    problems = [p for p in questions for _ in range(cfg.samples_per_question)]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    stops = stop_token_ids(student, tokenizer)
    rollouts = _rollouts(cfg, student, tokenizer, problems, vocab_size, generator, progress)
    rewards = [float(task.verify(r.problems[0], r.texts[0])) for r in rollouts]
    summary, timing = {"student_accuracy": float(np.mean(rewards)), "rollouts": len(rollouts)}, {}

    def timed(name, fn):
        start = time.perf_counter()
        if progress:
            console.print(f"[dim]{name} ...[/dim]")
        summary[name] = fn()
        timing[name] = time.perf_counter() - start

    if "sfd" in cfg.checks:
        fcfg = FidelityConfig(num_prompts=cfg.num_questions, split=cfg.split,
                              samples_per_prompt=cfg.samples_per_question, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, bin_size=cfg.sfd_bin_size,
                              min_bin_tokens=cfg.sfd_min_bin_tokens, continuations=cfg.sfd_continuations,
                              num_cuts=cfg.sfd_num_cuts, batch_size=cfg.batch_size,
                              max_continuations=max(1, cfg.sfd_continuations * cfg.sfd_num_cuts * len(problems)))
        timed("sfd", lambda: summarise_sfd(measure_fidelity(
            student, teacher, tokenizer, task, fcfg, seed=cfg.seed, vocab_size=vocab_size,
            chunk_size=cfg.chunk_size, progress=False), cfg))
    if "lgr" in cfg.checks:
        def lgr():
            nodes = lgr_nodes(cfg, student, teacher, tokenizer, task, rollouts, vocab_size, stops, generator, rng,
                              progress=progress)
            return {**summarise_lgr(nodes, cfg), "node_records": nodes}
        timed("lgr", lgr)
    if "privileged" in cfg.checks:
        timed("privileged", lambda: summarise_privileged(
            trace_accuracy(cfg, privileged_teacher, tokenizer, task, questions, vocab_size),
            rollout_shift(cfg, privileged_teacher, tokenizer, rollouts, vocab_size), cfg))
    if "alignment" in cfg.checks:
        timed("alignment", lambda: summarise_alignment(
            p_succ_nodes(cfg, student, tokenizer, task, rollouts, rewards, vocab_size, stops, generator,
                         progress=progress), cfg))
    summary["verdicts"] = verdicts(summary, cfg)
    summary["timing"] = {**timing, "total_s": time.perf_counter() - t0}
    summary["config"] = cfg.model_dump(mode="json")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(summary, indent=1) + "\n")
    for line in report_lines(summary):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'diagnose.json'} ({summary['timing']['total_s']:.0f} s)")
    return summary


def _ci(c: dict | None, fmt: str = "+.3f") -> str:
    if not c or c.get("value") is None:
        return "-"
    if c.get("lo") is None:
        return f"{c['value']:{fmt}}"
    return f"{c['value']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


def _fit(f: dict | None) -> str:
    return "-" if f is None else f"amplitude {f['amplitude']:+.3f}, R2 {f['r2']:.2f}"


def report_lines(summary: dict) -> list[str]:
    """The report: per check its verdict, then one line per figure, 'figure: value [interval]  (null)'."""
    cfg = summary["config"]
    v = summary["verdicts"]
    lines = [f"preconditions of {cfg['student']['path']} / {cfg['teacher']['path']} on {cfg['task']['name']}: "
             f"{summary['rollouts']} student rollouts, accuracy {summary['student_accuracy']:.0%}; "
             f"{round(100 * cfg['confidence'])}% intervals"]
    if "sfd" in summary:
        s = summary["sfd"]
        lines += [f"SFD: {v['sfd']}",
                  f"  F decay, first bin - from position {s['late_from']} on: student prefixes "
                  f"{_ci(s.get('student_decay'))}; teacher's own {_ci(s.get('teacher_decay'))}",
                  f"  decay excess (student - teacher): {_ci(s.get('excess_decay'))}  (null 0)",
                  f"  logistic fit of F(t): student {_fit(s['fit']['student'])}; teacher {_fit(s['fit']['teacher'])}"]
        if s["cuts"]:
            cuts = ", ".join(f"t={c['position']}: {_ci(c, '.2f')} (n={c['n']})" for c in s["cuts"])
            lines += [f"  teacher accuracy from cut student prefixes: {cuts}",
                      f"  drop, first cut - last: {_ci(s['continuation_drop'], '+.2f')}  (null 0)"]
    if "lgr" in summary:
        g = summary["lgr"]
        lines += [f"LGR: {v['lgr']}",
                  f"  Spearman(r(k), V_k), mean over {g['informative_nodes']} informative of {g['nodes']} trigger "
                  f"nodes: {_ci(g['spearman'])}  (null 0)",
                  f"  top-reward candidate is a best one: {_ci(g['top_reward_is_best'], '.2f')}  "
                  f"(a random candidate: {_ci(g['random_candidate_is_best'], '.2f')})",
                  f"  raw rewards: mean {g['reward_mean'] or 0:.4f}, median within-group std "
                  f"{g['group_std_median'] or 0:.5f}",
                  "  corr(r~(k), V_k - mean V) over all candidates, by objective.lookahead.norm:"]
        for n in g["normalisations"]:
            share = n["bonus_share_on_uninformative"]
            lines.append(f"    {n['label']:<10} {_ci(n['corr_with_advantage'])}; bonus on uninformative nodes "
                         + ("-" if share is None else f"{share:.0%}"))
    if "privileged" in summary:
        p = summary["privileged"]
        acc = p["accuracy"]
        lines += [f"privileged: {v['privileged']}",
                  "  teacher greedy accuracy, no / partial / full trace: "
                  + " / ".join(_ci(acc[k], ".2f") for k in ("none", "partial", "full")),
                  f"  trace gain: full - none {_ci(p['gain_full'], '+.2f')}, partial - none "
                  f"{_ci(p['gain_partial'], '+.2f')}  (null 0)",
                  f"  belief shift per token: KL(q_F || q_P) {_ci(p['kl_full_partial'], '.4f')}; "
                  f"KL(q_F || q_none) {_ci(p['kl_full_none'], '.4f')}",
                  f"  q on the answer's first token before the rollout writes it ({p['answer_mass_positions']} "
                  f"number starts): full {_ci(p['answer_mass_full'], '.3f')}, no trace "
                  f"{_ci(p['answer_mass_none'], '.3f')}, difference {_ci(p['answer_mass_gain'], '+.3f')}"]
    if "alignment" in summary:
        a = summary["alignment"]
        cells = ", ".join(f"[{b['lo']:g}, {b['hi']:g}{']' if b['hi'] == 1 else ')'}: {b['correct']} / {b['incorrect']}"
                          for b in a["bins"])
        lines += [f"alignment: {v['alignment']} nodes (at least {cfg['alignment_min_nodes']} per cell)",
                  f"  nodes per P_succ bin, correct / incorrect rollouts: {cells}",
                  f"  share of incorrect-rollout nodes below P_succ 0.2: "
                  f"{_ci(a['incorrect_nodes_in_lowest_bin'], '.2f')}"]
    return lines


def run_diagnostic(cfg: PreconditionsConfig, console=None) -> dict:
    """`opdlab diagnose [--pair NAME] [CONFIG.yaml] [key=value ...]` (`opdlab.cli`)."""
    return run_preconditions(cfg, console=console)
