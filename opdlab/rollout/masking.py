"""Special-token masking (docs/methods.md#special-token-masking): token ids excluded from every objective's loss and
token count.

The masked set is `objective.mask_tokens` (vocabulary strings) plus, with `objective.auto_mask`:

- when the teacher's and student's special tokens or chat templates differ (a template mismatch, e.g. a teacher
  whose template writes think tags the student's never does), the special tokens of either tokenizer:
  `all_special_ids`, added tokens marked special, added tokens that occur in a chat template (e.g.
  <|im_start|>), and think tags (<think>, </think>) where the vocabulary has them;
- tokens whose text the two tokenizers split differently: for each id, each tokenizer's round trip
  `encode(decode([id]))`, compared between teacher and student (empty for identical tokenizers).

So a teacher and student of one family with one template mask nothing automatically. That is deliberate: a masked
token costs the student nothing, and with nothing teaching it not to, a student emits masked tokens more and more
(on the tiny test models, unconditional masking of <|im_start|> / <|pad|> / <|unk|> took them from 4 % to 22 % of
sampled tokens in 20 OPD steps and doubled the KL to the teacher). Where the templates agree the teacher's verdict
on a special token is as valid as on any other; list tokens in `objective.mask_tokens` to mask them anyway.

Stop tokens (EOS and the generation config's) are never masked automatically: the completion ends with one and the
student has to learn to emit it; list one in `objective.mask_tokens` to mask it anyway.

The mask lands in `Rollouts.loss_mask_B_T` (`with_loss_mask`), which every objective sums and normalises over.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from opdlab.types import Rollouts

THINK_TAGS = ("<think>", "</think>")


def special_token_ids(tokenizer) -> set[int]:
    """Special and chat-template token ids of one tokenizer."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    template = _chat_template(tokenizer)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special or (added.content and added.content in template):
            ids.add(int(i))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tag] for tag in THINK_TAGS if tag in vocab)
    return ids


def _fingerprint(tokenizer) -> tuple | None:
    """Everything that decides a fast tokenizer's encode/decode, or None when that cannot be told."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return (type(tokenizer).__name__, backend.to_str(), getattr(tokenizer, "clean_up_tokenization_spaces", None),
            getattr(tokenizer, "split_special_tokens", None))


def _chat_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else " ".join(template[k] for k in sorted(template))


def template_mismatch(student_tokenizer, teacher_tokenizer) -> bool:
    """Whether the two sides disagree on special tokens or chat template."""
    return (special_token_ids(student_tokenizer) != special_token_ids(teacher_tokenizer)
            or _chat_template(student_tokenizer) != _chat_template(teacher_tokenizer))


def mismatched_token_ids(student_tokenizer, teacher_tokenizer) -> set[int]:
    """Ids whose decoded text the two tokenizers encode differently: the student's
    `encode(decode([id]))` differs from the teacher's. Two identical tokenizers (the same serialised fast
    tokenizer) split everything alike, so the (seconds-long, for 150k tokens) comparison is skipped for them."""
    fingerprint = _fingerprint(student_tokenizer)
    if fingerprint is not None and fingerprint == _fingerprint(teacher_tokenizer):
        return set()
    ids = list(range(min(len(student_tokenizer), len(teacher_tokenizer))))
    round_trips = []
    for tok in (student_tokenizer, teacher_tokenizer):
        texts = tok.batch_decode([[i] for i in ids])
        round_trips.append(tok(texts, add_special_tokens=False)["input_ids"])
    return {i for i, a, b in zip(ids, *round_trips) if a != b}


def token_ids_of(tokenizer, tokens: list[str]) -> set[int]:
    """Vocabulary ids of `objective.mask_tokens` entries; an entry that is no single token is an error."""
    vocab = tokenizer.get_vocab()
    out = set()
    for t in tokens:
        if t in vocab:
            out.add(vocab[t])
            continue
        encoded = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"objective.mask_tokens: {t!r} is not a single token of the student's vocabulary "
                             f"(it encodes to {len(encoded)} tokens); allowed: vocabulary entries, e.g. "
                             f"{tokenizer.all_special_tokens[:3]}")
        out.add(encoded[0])
    return out


def masked_token_ids(student_tokenizer, teacher_tokenizer, mask_tokens: list[str], auto_mask: bool,
                     keep: list[int] = (), templates_agree: bool | None = None) -> list[int]:
    """The sorted ids excluded from the loss (see the module docstring); `keep` (stop tokens) is exempt from the
    automatic part only. `templates_agree`: whether the two chat templates render completions alike
    (`opdlab.models.prompts.check_completion_agreement`), which then decides instead of comparing the templates'
    text (two templates that differ only in a system prompt or the generation prompt mask nothing)."""
    auto: set[int] = set()
    if auto_mask:
        mismatch = template_mismatch(student_tokenizer, teacher_tokenizer) if templates_agree is None else \
            special_token_ids(student_tokenizer) != special_token_ids(teacher_tokenizer) or not templates_agree
        if mismatch:
            auto = special_token_ids(student_tokenizer) | special_token_ids(teacher_tokenizer)
        auto |= mismatched_token_ids(student_tokenizer, teacher_tokenizer)
        auto -= set(keep)
    return sorted(auto | token_ids_of(student_tokenizer, list(mask_tokens)))


def with_loss_mask(rollouts: Rollouts, masked_ids: list[int]) -> Rollouts:
    """`rollouts` with loss_mask_B_T = completion mask minus positions holding a masked token."""
    ids = torch.as_tensor(masked_ids, dtype=torch.long, device=rollouts.completion_ids_B_T.device)
    hit_B_T = torch.isin(rollouts.completion_ids_B_T, ids)
    loss_mask_B_T = rollouts.completion_mask_B_T * (~hit_B_T).to(rollouts.completion_mask_B_T.dtype)
    return replace(rollouts, loss_mask_B_T=loss_mask_B_T)
