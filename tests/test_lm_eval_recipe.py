"""The evaluation recipe of docs/training.md#evaluating-with-lm-evaluation-harness, end to end with the real
lm-evaluation-harness: a short training run, `opdlab export`, then the harness's `simple_evaluate` (model 'hf', the
chat template applied) on a small local task written as the harness's task YAML. The harness's exact_match is
checked against this file's own greedy generation with transformers: half of the task's targets are the model's
own greedy answers and half are not, so the score must be exactly 0.5.

    python -m pytest tests/test_lm_eval_recipe.py -q

Skips when lm-eval is not installed (`pip install -r requirements-evals.txt`).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdlab import cli
from opdlab.config import load_config
from opdlab.models.prompts import render_prompt
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.train import train
from test_train import overrides

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-evals.txt)")

MAX_TOKENS = 12
TASK_YAML = """\
task: opdlab_local_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def greedy_answers(model_dir, questions: list[str]) -> list[str]:
    """Greedy completions of the chat-rendered questions, cut at the first newline, as the harness would cut them."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for q in questions:
        ids = tok(render_prompt(tok, q), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(text.split("\n")[0])
    return out


def test_exported_checkpoint_through_lm_eval_harness(model_dirs, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(None, overrides(model_dirs, run_dir, "train.steps=2", "student.system_prompt=Be exact.")),
          progress=False)
    export = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--out", str(export)]) == 0

    questions = [p.question for p in ArithmeticTask(1, 2, seed=3, test_size=6, max_value=19).problems("test")]
    answers = greedy_answers(export, questions)
    targets = [a if i % 2 == 0 else a + " (not this)" for i, a in enumerate(answers)]
    data = tmp_path / "tasks" / "test.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": q, "answer": t}) + "\n" for q, t in zip(questions, targets)))
    (tmp_path / "tasks" / "opdlab_local_arith.yaml").write_text(TASK_YAML.format(data=data, max_tokens=MAX_TOKENS))

    from lm_eval.tasks import TaskManager
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export},dtype=float32", tasks=["opdlab_local_arith"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), apply_chat_template=True,
        batch_size=1, device="cpu", log_samples=True)
    assert results["results"]["opdlab_local_arith"]["exact_match,none"] == pytest.approx(0.5)
    samples = results["samples"]["opdlab_local_arith"]
    # the harness rendered the exported tokenizer's template, with the system prompt the run was trained with
    prompt = samples[0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")
    assert sorted(s["filtered_resps"][0] for s in samples) == sorted(answers)
