"""Load any Hugging Face causal LM and its tokenizer; check that a teacher and a student can be paired; the
built-in tiny models.

The built-in models are ordinary transformers models (Llama architecture, built from a config) with a
character-level tokenizer built with `tokenizers`, saved with `save_pretrained` and loaded back through the same
`from_pretrained` path as any hub model, so everything tested on them runs unchanged on real models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opdlab.config import ModelConfig
from opdlab.models.lora import add_adapters, is_adapter_dir, load_merged
from opdlab.models.prompts import apply_prompt_format

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

# Sizes of the built-in models (0.88M and 0.38M parameters). The teacher is wider and deeper and is warm-started
# longer than the student. Embeddings are untied: with tied embeddings and the 1e-3..3e-3 learning rates that
# train these models in minutes, the digit embeddings collapsed onto each other and the model stayed at a uniform
# guess over digits (loss ~2.2 nats per digit) for the whole warm start.
BUILTIN_SIZES = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "student": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=4),
}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what and why."""


def cache_root() -> Path:
    return Path(os.environ.get("OPDLAB_CACHE", Path.home() / ".cache" / "opdlab"))


def builtin_dir(name: str) -> Path:
    return cache_root() / "builtin" / name


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with chat-template special tokens."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["<|unk|>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|unk|>", padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_builtin_model(name: str, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised built-in model ('teacher' or 'student')."""
    if name not in BUILTIN_SIZES:
        raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(BUILTIN_SIZES)}")
    size = BUILTIN_SIZES[name]
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=2048, num_key_value_heads=size["num_attention_heads"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **size,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def resolve_path(path: str) -> str:
    """Map 'builtin:NAME' to its cache directory; anything else is returned as given."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        d = builtin_dir(name)
        if not (d / "config.json").is_file():
            raise ModelLoadError(
                f"built-in model {path!r} has not been prepared yet (looked in {d}); run `opdlab prepare` "
                f"(or `opdlab demo`, which prepares it) first")
        return str(d)
    return path


def resolve_dtype(cfg: ModelConfig, trainable: bool, precision: str = "fp32") -> torch.dtype:
    """The weights' dtype in memory: `cfg.dtype`, where 'auto' is float32 for trained weights (the master copy) and,
    for a frozen model, bfloat16 under bf16-mixed precision (autocast would cast fp32 weights on every op) and
    float32 otherwise."""
    if cfg.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return torch.bfloat16 if precision == "bf16-mixed" and not trainable else torch.float32


def load_tokenizer(path: str):
    path = resolve_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_explain_load_failure(path, "tokenizer", e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", trainable: bool = False,
               precision: str = "fp32", name: str = "model"):
    """(model, tokenizer) for a local directory, hub id or 'builtin:NAME', in `resolve_dtype`'s dtype. A directory of
    LoRA adapters (a LoRA run's checkpoint) loads as its base with the adapters merged in. With `trainable` and
    `cfg.lora.r > 0` (a `StudentConfig`) the model is the frozen base with trainable adapters (`opdlab.models.lora`).
    The tokenizer carries `cfg`'s prompt format (`opdlab.models.prompts.apply_prompt_format`; errors name the
    config section `name`), applied before any weights load."""
    path = resolve_path(cfg.path)
    check_local(path)
    tokenizer = apply_prompt_format(load_tokenizer(cfg.path), cfg, name)
    lora = getattr(cfg, "lora", None)
    adapters = trainable and lora is not None and lora.r > 0
    dtype = resolve_dtype(cfg, trainable and not adapters, precision)  # adapters: the base is frozen
    try:
        if is_adapter_dir(path):
            model = load_merged(path, dtype, cfg.attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_explain_load_failure(path, "model", e)) from None
    model.to(device)
    model.requires_grad_(trainable and not adapters)
    if adapters:
        model = add_adapters(model, lora, path)
    model.train(trainable)
    return model, tokenizer


def _looks_local(path: str) -> bool:
    """A path that cannot be a hub id ('org/name' or 'name'): absolute, relative with ./ or ~, deeper than one
    slash, or under a directory that exists here (runs/x, checkpoints/y)."""
    first = path.split("/", 1)[0]
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or ("/" in path and os.path.isdir(first))


def check_local(path: str) -> None:
    """Fail at once, before any hub retries, for a local-looking model path that does not exist."""
    if not os.path.exists(path) and _looks_local(path):
        raise ModelLoadError(f"model path {path!r} does not exist (relative paths are read from {os.getcwd()})")


def _explain_load_failure(path: str, what: str, err: Exception) -> str:
    if os.path.isdir(path):
        return f"could not load the {what} from directory {path!r}: {err}"
    if os.path.exists(path):
        return f"{path!r} is a file; expected a model directory or a hub id ({err})"
    if _looks_local(path):
        return f"model path {path!r} does not exist"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (f"could not load the {what} {path!r}: it is not a local directory, and fetching it from the Hugging "
            f"Face hub failed{' (HF_HUB_OFFLINE=1)' if offline else ' (is the hub reachable from here?)'}. "
            f"Download it where the hub is reachable and pass the local directory instead. Cause: {err}")


@dataclass(frozen=True)
class Pairing:
    """What the trainer needs to know about a teacher/student pair."""

    vocab_size: int  # token ids both models score: logits beyond it (embedding padding) are dropped


def check_compatible(student, student_tok, teacher, teacher_tok) -> Pairing:
    """The pair must share a tokenizer; embedding matrices may be padded to different row counts."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ModelLoadError(
            f"teacher and student tokenizers differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}); "
            f"only in student: {only_s}, only in teacher: {only_t}, different ids: {moved}. "
            f"Cross-tokenizer distillation is not supported: pick a teacher and student of one model family")
    n_tok = len(student_tok)
    rows = []
    for who, model in (("student", student), ("teacher", teacher)):
        r = model.get_output_embeddings().weight.shape[0]
        if r < n_tok:
            raise ModelLoadError(f"{who} output layer has {r} rows but the tokenizer has {n_tok} tokens")
        rows.append(r)
    return Pairing(vocab_size=min(rows))
