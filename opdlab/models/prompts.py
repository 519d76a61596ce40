"""Turn task questions into model inputs: the chat template where the tokenizer has one, plain text otherwise."""
from __future__ import annotations

import torch


def render_prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return question + "\n"


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
