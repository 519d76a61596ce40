"""Tests of model loading and teacher/student pairing (`opdlab.models.loading`).

    python -m pytest tests/test_models.py -q
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from conftest import STUDENT_SIZE, TEACHER_SIZE, tiny_llama
from opdlab.config import ModelConfig
from opdlab.models.loading import ModelLoadError, build_char_tokenizer, check_compatible, load_model


def retokenized(tok, edit) -> PreTrainedTokenizerFast:
    """A copy of `tok` whose vocabulary has been changed by `edit(vocab_dict)`."""
    import json

    spec = json.loads(tok.backend_tokenizer.to_str())
    edit(spec["model"]["vocab"])
    new = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<|pad|>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|unk|>")
    return new


def test_load_model_from_local_dir(model_dirs, tokenizer):
    model, tok = load_model(ModelConfig(path=str(model_dirs["student"])))
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ref = tiny_llama(tokenizer, 1, **STUDENT_SIZE)  # the saved weights are the ones built from seed 1
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    trainable, _ = load_model(ModelConfig(path=str(model_dirs["student"])), trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_check_compatible_accepts_padded_output_layer(tokenizer):
    student = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    teacher = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    assert check_compatible(student, tokenizer, teacher, tokenizer).vocab_size == len(tokenizer)
    teacher.resize_token_embeddings(len(tokenizer) + 28, mean_resizing=False)
    assert teacher.get_output_embeddings().weight.shape[0] == len(tokenizer) + 28
    assert check_compatible(student, tokenizer, teacher, build_char_tokenizer()).vocab_size == len(tokenizer)
    student.resize_token_embeddings(len(tokenizer) + 5, mean_resizing=False)
    assert check_compatible(student, tokenizer, teacher, tokenizer).vocab_size == len(tokenizer) + 5


def test_check_compatible_rejects_extra_token(tokenizer):
    student = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    teacher = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    other = build_char_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(ModelLoadError) as e:
        check_compatible(student, tokenizer, teacher, other)
    msg = str(e.value)
    assert "<|extra|>" in msg and "only in teacher" in msg and "differ" in msg


def test_check_compatible_rejects_moved_ids(tokenizer):
    def swap(vocab):
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    other = retokenized(tokenizer, swap)
    assert other.convert_tokens_to_ids("a") == tokenizer.convert_tokens_to_ids("b")
    assert len(other) == len(tokenizer)
    student = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    teacher = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    with pytest.raises(ModelLoadError) as e:
        check_compatible(student, tokenizer, teacher, other)
    msg = str(e.value)
    assert "different ids: ['a', 'b']" in msg


def test_check_compatible_rejects_output_layer_smaller_than_tokenizer(tokenizer):
    student = tiny_llama(tokenizer, 1, **STUDENT_SIZE)
    teacher = tiny_llama(tokenizer, 2, **TEACHER_SIZE)
    teacher.resize_token_embeddings(len(tokenizer) - 3, mean_resizing=False)
    with pytest.raises(ModelLoadError, match="teacher output layer has"):
        check_compatible(student, tokenizer, teacher, tokenizer)


def test_load_missing_local_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path=str(missing)))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_load_directory_without_model(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)  # a tokenizer but no config.json / weights
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path=str(tmp_path)))
    assert str(tmp_path) in str(e.value) and "model" in str(e.value)


def test_load_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time by the hub client
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path="no-such-org/no-such-model"))
    msg = str(e.value)
    assert "'no-such-org/no-such-model'" in msg  # what was asked
    assert "HF_HUB_OFFLINE=1" in msg and "not a local directory" in msg  # why it failed
    assert "local directory instead" in msg  # what to do


def test_unprepared_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path="builtin:xyz"))
    msg = str(e.value)
    assert "'builtin:xyz'" in msg and "opdlab prepare" in msg and str(tmp_path) in msg
