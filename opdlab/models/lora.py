"""Low-rank adapters on the student, through `peft` (`student.lora.r > 0`).

    student = add_adapters(base, cfg.student.lora, base_path)   # a peft model: only the adapters train
    adapter_state(student)                                      # what a checkpoint holds: the adapters
    load_merged(checkpoint_model_dir, dtype)                    # base + adapters merged into a plain model

The base model is frozen and may be stored in bf16 (under bf16-mixed precision, `opdlab.models.loading`); the
adapters are created in fp32 whatever the base's dtype (peft's `autocast_adapter_dtype`), so their AdamW updates are
not rounded away. A checkpoint's `model/` directory holds `adapter_config.json` and `adapter_model.safetensors`
(plus the tokenizer); `load_merged` reads the base from the path recorded there, which is absolute for a local
base, and `opdlab export` writes the merged model as a plain Hugging Face directory.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opdlab.config import LoRAConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapted(model) -> bool:
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    """A directory that holds LoRA adapters (a LoRA run's checkpoint) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def add_adapters(model, cfg: LoRAConfig, base_path: str):
    """`model` frozen, with trainable fp32 LoRA adapters of rank `cfg.r` on `cfg.target_modules`."""
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    # an absolute path, so that a checkpoint's adapters find their base from any working directory
    peft_cfg.base_model_name_or_path = os.path.abspath(base_path) if os.path.isdir(base_path) else base_path
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters by name, copied to the CPU: a LoRA checkpoint's model state."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_weights(model, model_dir: Path) -> None:
    """Load a checkpoint's adapters into `model` (a peft model of the same configuration)."""
    weights = load_file(Path(model_dir) / ADAPTER_WEIGHTS, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"adapters in {model_dir} do not match the student's: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")


def load_merged(model_dir: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """The base model named in `model_dir`'s adapter config with the adapters merged into its weights: a plain
    transformers model, as `from_pretrained` of a full checkpoint would give."""
    peft_cfg = PeftConfig.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(peft_cfg.base_model_name_or_path, dtype=dtype,
                                                attn_implementation=attn_implementation)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()


class AdaptersDisabled(torch.nn.Module):
    """A LoRA student's base model with its adapters switched off in every call (`privileged.teacher=lora_base`):
    the initial student as a teacher without a second copy of the weights. Scoring goes through `get_decoder()` and
    `get_output_embeddings()`, sampling through the call itself; everything else is the student's."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, *args, **kwargs):
        with self.student.disable_adapter():
            return self.student(*args, **kwargs)

    def get_decoder(self) -> torch.nn.Module:
        return _Disabled(self.student, self.student.get_decoder())

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.student.get_output_embeddings()

    @property
    def config(self):
        return self.student.config

    @property
    def generation_config(self):
        return self.student.generation_config


class _Disabled(torch.nn.Module):
    """`module` called with the student's adapters switched off."""

    def __init__(self, student, module: torch.nn.Module):
        super().__init__()
        self.student, self.module = student, module

    def forward(self, *args, **kwargs):
        with self.student.disable_adapter():
            return self.module(*args, **kwargs)
