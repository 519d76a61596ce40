"""Turn task questions into model inputs: the chat template where the tokenizer has one, plain text otherwise.

A model's prompt format (`system_prompt`, `chat_template`, `chat_template_kwargs` of its config section) is written
into its tokenizer's chat template when the model is loaded (`apply_prompt_format`): the system message and the
variables become `{% set %}` statements at the template's head. Every renderer of prompts (sampling, evaluation, SFT,
the teacher's views, vLLM, a checkpoint's or an export's tokenizer) then formats them alike.

OPD scores the student's completion tokens after the teacher's prompt, so the two templates must render a
completion the same way: `check_completion_agreement` renders one assistant turn with each and compares the tokens
after each side's generation prompt (a template that inserts think tags, or ends a turn with another token, fails
it unless the difference is special tokens only, which special-token masking then leaves out of the loss).
"""
from __future__ import annotations

from pathlib import Path

import jinja2.meta
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from opdlab.config import ConfigError, ModelConfig


def render_prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return question + "\n"


def chat_template_variables(template: str) -> set[str]:
    """The variables a Jinja chat template reads (besides `messages`), e.g. add_generation_prompt,
    enable_thinking."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return jinja2.meta.find_undeclared_variables(env.parse(template)) - {"messages"}


def _jinja_literal(value) -> str:
    """`value` (from YAML: str, number, bool, None, list, dict) as a Jinja expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_jinja_literal(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot pass {value!r} ({type(value).__name__}) to a chat template")


def with_prompt_format(template: str, system_prompt: str | None, kwargs: dict) -> str:
    """`template` with `kwargs` set as its variables and `system_prompt` put first in `messages` (unless the
    messages already start with a system turn)."""
    head = "".join(f"{{% set {k} = {_jinja_literal(v)} %}}" for k, v in kwargs.items())
    if system_prompt is not None:
        head += ("{% if not messages or messages[0]['role'] != 'system' %}{% set messages = [{'role': 'system', "
                 f"'content': {_jinja_literal(system_prompt)}}}] + messages %}}{{% endif %}}")
    return head + template


def apply_prompt_format(tokenizer, cfg: ModelConfig, name: str = "model"):
    """Write `cfg`'s chat template, system prompt and template variables into `tokenizer` (in place; returned).
    `name` is the config section ('student', 'teacher', 'model') that errors name."""
    if cfg.chat_template is not None:
        text = cfg.chat_template
        if "{%" not in text and "{{" not in text:  # a path
            path = Path(text).expanduser()
            if not path.is_file():
                raise ConfigError(f"invalid configuration: {name}.chat_template: no such file {text!r} (an inline "
                                  f"template holds {{% or {{{{)")
            text = path.read_text()
        try:
            chat_template_variables(text)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"invalid configuration: {name}.chat_template: not a valid Jinja template: {e} "
                              f"(line {e.lineno})") from None
        tokenizer.chat_template = text
    if cfg.system_prompt is None and not cfg.chat_template_kwargs:
        return tokenizer
    template = getattr(tokenizer, "chat_template", None)
    what = "system_prompt" if cfg.system_prompt is not None else "chat_template_kwargs"
    if not isinstance(template, str) or not template:
        raise ConfigError(f"invalid configuration: {name}.{what}: the tokenizer of {cfg.path!r} has "
                          f"{'several named chat templates' if template else 'no chat template'}; give one with "
                          f"{name}.chat_template")
    unused = sorted(set(cfg.chat_template_kwargs) - chat_template_variables(template))
    if unused:
        raise ConfigError(f"invalid configuration: {name}.chat_template_kwargs: the chat template of {cfg.path!r} "
                          f"does not read {', '.join(map(repr, unused))} (got {cfg.chat_template_kwargs}); the "
                          f"variables it reads: {', '.join(sorted(chat_template_variables(template))) or 'none'}")
    tokenizer.chat_template = with_prompt_format(template, cfg.system_prompt, dict(cfg.chat_template_kwargs))
    return tokenizer


def completion_tokens(tokenizer, question: str, completion: str) -> list[int] | None:
    """The tokens an assistant turn holding `completion` adds after the generation prompt, as the chat template
    renders them (the completion, then the end of the turn); None when the template's assistant turn does not start
    with its own generation prompt (e.g. it inserts think tags there). Without a template: the completion's."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(completion, add_special_tokens=False)["input_ids"]
    prompt = render_prompt(tokenizer, question)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": completion}], tokenize=False)
    ids_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids_full = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids_full[:len(ids_prompt)] != ids_prompt:
        return None
    return ids_full[len(ids_prompt):]


def check_completion_agreement(student_tokenizer, teacher_tokenizer, question: str, completion: str,
                               special_ids: set[int] = frozenset()) -> bool:
    """Whether the two chat templates render an assistant turn holding `completion` with the same tokens after
    their generation prompts: True when they do (or the templates are one), False when they differ in `special_ids`
    alone (which masking then leaves out of the loss); otherwise a `ConfigError` that shows both renderings."""
    s_template = getattr(student_tokenizer, "chat_template", None)
    if s_template == getattr(teacher_tokenizer, "chat_template", None):
        return True
    sides = {"student": student_tokenizer, "teacher": teacher_tokenizer}
    tails = {who: completion_tokens(tok, question, completion) for who, tok in sides.items()}
    if tails["student"] == tails["teacher"]:
        return True
    hint = ("The teacher would score the student's tokens in a context its template never produces, which corrupts "
            "OPD silently: give teacher.chat_template (or the student's) and chat_template_kwargs so that both "
            "render a completion alike")
    for who, tail in tails.items():
        if tail is None:
            raise ConfigError(
                f"the {who}'s chat template does not begin an assistant turn with its own generation prompt "
                f"(generation prompt {render_prompt(sides[who], question)[-40:]!r}), so its completion tokens differ "
                f"from what the other side scores or samples. {hint}")
    if special_ids and [i for i in tails["student"] if i not in special_ids] == \
            [i for i in tails["teacher"] if i not in special_ids]:
        return False
    s, t = tails["student"], tails["teacher"]
    first = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
    raise ConfigError(
        f"the student's and the teacher's chat templates render a completion differently, from its token {first}: "
        f"student {student_tokenizer.decode(s[first:first + 8])!r}, teacher "
        f"{teacher_tokenizer.decode(t[first:first + 8])!r} (completion {completion[:40]!r}). {hint}")


def encode_prompts(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids_B_P, mask_B_P). Rendered chat templates already hold their special tokens."""
    add_special = not getattr(tokenizer, "chat_template", None)
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special)
    return enc["input_ids"], enc["attention_mask"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS plus any the generation config lists."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    return sorted(ids)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
