"""Shared fixtures: two tiny random Llama models (student and teacher) saved with `save_pretrained` beside the
built-in character tokenizer, so configs can point `student.path` / `teacher.path` at ordinary local directories
and everything goes through the real `from_pretrained` path.

Every xdist worker builds its own copy (a fraction of a second), so the fixtures work with `-n 2`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opdlab.models.loading import build_char_tokenizer

# One intra-op thread: the models are tiny and the machine is a shared 2-core box. Set at import time so it also
# holds for module-scoped fixtures that run before any function-scoped fixture.
torch.set_num_threads(1)

# Student: tied embeddings like the built-in models. Teacher: untied, deeper, and initialised with a large
# weight scale so its next-token distributions are peaked (a student far from it, with a lot to learn).
STUDENT_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1)
TEACHER_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=False, initializer_range=0.2)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


def tiny_llama(tokenizer, seed: int, extra_rows: int = 0, **size) -> LlamaForCausalLM:
    """A random Llama over `tokenizer`, with `extra_rows` padding rows in the embedding / output layer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer) + extra_rows, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{'student': dir, 'teacher': dir}: saved models, each with the tokenizer beside it."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for name, size, seed in (("student", STUDENT_SIZE, 1), ("teacher", TEACHER_SIZE, 2)):
        model = tiny_llama(tokenizer, seed, **size)
        d = root / name
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture
def student_model(tokenizer):
    return tiny_llama(tokenizer, 1, **STUDENT_SIZE)


@pytest.fixture
def teacher_model(tokenizer):
    return tiny_llama(tokenizer, 2, **TEACHER_SIZE)
