"""A lean decoding step for Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3), for `sample()`.

A decoding step of a small model at a batch of a few rows is not limited by its products but by the number of
operators it runs: transformers' forward spends most of a step in thousands of small operators (norms written out
op by op, rotary embeddings per head tensor, seven separate products a layer, and under bf16 autocast a cast before
every product). This module runs the same computation with fewer operators, from the model's own weights:

- q, k and v are one product (their weights concatenated), and so are the MLP's gate and up projections;
- every weight is cast to the product dtype once per `sample()` call (bf16 under bf16 autocast) and, on a CPU where
  oneDNN runs bf16, reordered once for its linear (as `opdlab.rollout.packed` does for transformers' forward);
- norms are one `rms_norm` call, q and k get their rotary embedding together, the key/value cache is two
  preallocated tensors written in place, and attention reads only the filled part of it (on a CPU, a decoding
  step's attention is two batched products, the scale and the mask folded into the first);
- rows that repeat a prompt are prefilled once, and `sample()` drops finished rows from the batch it decodes
  (`keep_rows`), once a quarter of it has finished.

The dtypes are transformers' own under autocast: the residual stream in the embedding's dtype (fp32 master weights
in bf16-mixed), norms in fp32, products in the autocast dtype, rotary embeddings computed as transformers computes
them; but on a CPU attention runs in fp32 (PyTorch's bf16 attention kernel is several times slower there at one
query position), so its inputs are not rounded to bf16 as autocast rounds them. In fp32 the log-probs match
transformers' forward to float rounding (tests/test_lean_decoding.py); in bf16 the products differ from autocast's
in summation order only, so a near-tie can sample another token. A LoRA student (peft) decodes on its merged
weights, W + scale * B @ A, made once per call. Memory: while it samples, one copy of the model's Linear weights in
the product dtype, and a key/value cache for the batch (fp32 on a CPU).

`LeanDecoder.build(model, ...)` returns None, and `sample()` keeps transformers' forward, for anything else: other
architectures, activations other than SiLU, a sliding window shorter than the sequence, modules with accelerate hooks
(offloaded weights), FSDP2-sharded parameters, peft adapters other than LoRA. `why_not_lean(model)` says which.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from opdlab.models.packing import sliding_window
from opdlab.rollout.packed import packing_supported

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear_weight(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain Linear, or of a peft LoRA Linear with its active adapters merged in; None for
    anything else."""
    if isinstance(module, torch.nn.Linear) and "forward" not in vars(module) and not hasattr(module, "_hf_hook"):
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "get_delta_weight") or not isinstance(base, torch.nn.Linear):
        return None
    weight = base.weight
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def why_not_lean(model) -> str | None:
    """None if `LeanDecoder` can decode `model`, else the reason it cannot."""
    base = _base_model(model)
    if not isinstance(base, PreTrainedModel):
        return f"{type(base).__name__} is not a transformers model"
    cfg = base.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} (lean decoding knows {', '.join(LEAN_MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r} (lean decoding knows silu)"
    if hasattr(model, "peft_config") and any(getattr(c, "peft_type", None) is not None
                                            and str(getattr(c.peft_type, "value", c.peft_type)) != "LORA"
                                            for c in model.peft_config.values()):
        return "a peft adapter other than LoRA"
    if any(hasattr(m, "_hf_hook") for m in base.modules()):
        return "accelerate hooks on its modules (offloaded or dispatched weights)"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "sharded parameters (FSDP2): its forward gathers them, the lean step would not"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers / rotary embedding where Llama-family models keep them"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if _linear_weight(m) is None:
                return f"a projection that is not a plain or LoRA Linear ({type(m).__name__})"
    if _linear_weight(base.lm_head) is None:
        return f"an output layer that is not a plain Linear ({type(base.lm_head).__name__})"
    return None



class _Product:
    """y = x @ W^T (+ b) in the product dtype, on a weight cast once (and prepacked for oneDNN where it runs)."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor | None]], dtype: torch.dtype, rows: int,
                 prepack: bool):
        w = torch.cat([w.detach() for w, _ in weights]).to(dtype).contiguous()
        biases = [b for _, b in weights]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([b.detach() if b is not None else w_.new_zeros(w_.shape[0])
                                   for (w_, _), b in zip(weights, biases)]).to(dtype)
        self.out_features = w.shape[0]
        self.prepacked = prepack and dtype == torch.bfloat16
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows) if self.prepacked else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepacked:
            return F.linear(x, self.weight, self.bias)
        y_2d = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y_2d.reshape(*x.shape[:-1], self.out_features)


class LeanDecoder:
    """Prefill and decoding steps of a Llama-family model into its own key/value cache.

    Built from the model's current weights; the model must not change while the decoder is in use (build a new one
    after an optimizer step). `prefill(ids_B_P, mask_B_P, pos_B_P)` and `decode(tok_R, pos_R_1, mask_R_S)` return
    the next token's logits in the product dtype, as transformers' forward returns them."""

    def __init__(self, model, rows: int, max_len: int):
        base = _base_model(model)
        cfg, inner = base.config, base.model
        device = inner.embed_tokens.weight.device
        self.embed = inner.embed_tokens.weight.detach()  # the residual stream keeps its dtype
        autocast = torch.is_autocast_enabled(device.type)
        self.dtype = torch.get_autocast_dtype(device.type) if autocast else self.embed.dtype  # of the products
        prepack = packing_supported(device) and self.dtype == torch.bfloat16
        self.rotary = inner.rotary_emb
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                norm1=layer.input_layernorm.weight.detach(), norm2=layer.post_attention_layernorm.weight.detach(),
                qkv=_Product([_linear_weight(attn.q_proj), _linear_weight(attn.k_proj), _linear_weight(attn.v_proj)],
                             self.dtype, rows, prepack),
                o=_Product([_linear_weight(attn.o_proj)], self.dtype, rows, prepack),
                gate_up=_Product([_linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)], self.dtype, rows,
                                 prepack),
                down=_Product([_linear_weight(mlp.down_proj)], self.dtype, rows, prepack),
                q_norm=attn.q_norm.weight.detach() if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight.detach() if hasattr(attn, "k_norm") else None))
        self.final_norm = inner.norm.weight.detach()
        self.head = _Product([_linear_weight(base.lm_head)], self.dtype, rows, prepack)
        # Attention runs in fp32 on a CPU: there PyTorch's bf16 attention kernel took 1.08 ms for one decoding step's
        # layer (8 rows, 9 query / 3 key-value heads, 250 positions, 2 threads) against 0.15 ms in fp32
        # (docs/benchmarks.md). The keys and values are the same numbers (v is a bf16 product, stored exactly).
        self.attn_dtype = torch.float32 if device.type == "cpu" else self.dtype
        cache_shape = (len(self.layers), rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=self.attn_dtype, device=device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.attn_dtype, device=device)
        self.filled = 0

    @classmethod
    def build(cls, model, rows: int, max_len: int) -> LeanDecoder | None:
        """A decoder for `model`, or None where `why_not_lean(model)` gives a reason or a sliding window would cut
        a sequence of `max_len` positions."""
        if why_not_lean(model) is not None:
            return None
        window = sliding_window(_base_model(model).config)
        if window is not None and window < max_len:
            return None
        return cls(model, rows, max_len)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' RMSNorm: normalised in fp32, cast back to the input's dtype, times the weight (an fp32 input,
        # the residual stream, has nothing to cast: one call with the weight)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps=self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _attention(self, q_B_H_T_D: torch.Tensor, k_B_K_S_D: torch.Tensor, v_B_K_S_D: torch.Tensor,
                   mask_B_1_T_S: torch.Tensor, bias_BK_R_S: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention, (B, T, H * D). A CPU decoding step (one query position, `bias_BK_R_S` given:
        the mask as 0 / -inf, made once a step for every layer) runs as two batched products with the query heads
        grouped onto their key/value heads, the scale and the mask folded into the first (`baddbmm`); that ran 2.5x
        faster there than PyTorch's fused kernel (docs/benchmarks.md)."""
        B, H, T, D = q_B_H_T_D.shape
        K = k_B_K_S_D.shape[1]
        if bias_BK_R_S is None:
            out_B_H_T_D = F.scaled_dot_product_attention(q_B_H_T_D, k_B_K_S_D, v_B_K_S_D, attn_mask=mask_B_1_T_S,
                                                         enable_gqa=H != K)
            return out_B_H_T_D.transpose(1, 2).reshape(B, T, H * D)
        S = k_B_K_S_D.shape[2]
        q_BK_R_D = q_B_H_T_D.reshape(B * K, H // K, D)  # R = query heads per key/value head
        scores_BK_R_S = torch.baddbmm(bias_BK_R_S, q_BK_R_D, k_B_K_S_D.reshape(B * K, S, D).transpose(1, 2),
                                      alpha=D ** -0.5)
        return torch.bmm(scores_BK_R_S.softmax(-1), v_B_K_S_D.reshape(B * K, S, D)).view(B, T, H * D)

    def _forward(self, ids_B_T: torch.Tensor, pos_B_T: torch.Tensor, mask_B_1_T_S: torch.Tensor) -> torch.Tensor:
        """The next-token logits after `ids_B_T`; keys and values go to cache rows 0..B-1, positions filled on."""
        B, T = ids_B_T.shape
        start, H, K, D = self.filled, self.n_heads, self.n_kv, self.head_dim
        S = start + T
        x_B_T_E = F.embedding(ids_B_T, self.embed)
        cos_B_T_D, sin_B_T_D = self.rotary(x_B_T_E, pos_B_T)
        # transformers' rotate_half(x) * sin (Llama's; Mistral's and the Qwens' are the same) as x rolled by half a
        # head times sin with its first half negated: the same products, only the signs moved, in one operator
        half = D // 2
        cos_B_T_1_D = cos_B_T_D[:, :, None]
        sin_B_T_1_D = torch.cat((-sin_B_T_D[..., :half], sin_B_T_D[..., half:]), dim=-1)[:, :, None]
        bias_BK_R_S = None
        if T == 1 and x_B_T_E.device.type == "cpu":  # a decoding step's mask as the first product's addend
            bias_B_1_1_S = torch.zeros(mask_B_1_T_S.shape, dtype=self.attn_dtype, device=x_B_T_E.device)
            bias_B_1_1_S.masked_fill_(~mask_B_1_T_S, float("-inf"))
            bias_BK_R_S = bias_B_1_1_S.expand(B, K, H // K, S).reshape(B * K, H // K, S)
        for i, layer in enumerate(self.layers):
            h_B_T_E = self._norm(x_B_T_E, layer["norm1"]).to(self.dtype)
            qkv_B_T_F = layer["qkv"](h_B_T_E)
            q_B_T_H_D = qkv_B_T_F[..., :H * D].view(B, T, H, D)
            k_B_T_K_D = qkv_B_T_F[..., H * D:(H + K) * D].view(B, T, K, D)
            v_B_T_K_D = qkv_B_T_F[..., (H + K) * D:].view(B, T, K, D)
            if layer["q_norm"] is not None:  # Qwen3: RMSNorm over each head's q and k, before the rotary embedding
                q_B_T_H_D = self._norm(q_B_T_H_D, layer["q_norm"])
                k_B_T_K_D = self._norm(k_B_T_K_D, layer["k_norm"])
            qk_B_T_G_D = torch.cat((q_B_T_H_D, k_B_T_K_D), dim=2)
            qk_B_T_G_D = qk_B_T_G_D * cos_B_T_1_D + qk_B_T_G_D.roll(half, dims=-1) * sin_B_T_1_D
            qk_B_G_T_D = qk_B_T_G_D.transpose(1, 2).to(self.attn_dtype)
            self.k_cache[i, :B, :, start:S] = qk_B_G_T_D[:, H:]
            self.v_cache[i, :B, :, start:S] = v_B_T_K_D.transpose(1, 2)
            attn_B_T_F = self._attention(qk_B_G_T_D[:, :H], self.k_cache[i, :B, :, :S],
                                         self.v_cache[i, :B, :, :S], mask_B_1_T_S, bias_BK_R_S).to(self.dtype)
            x_B_T_E = x_B_T_E + layer["o"](attn_B_T_F)
            h_B_T_E = self._norm(x_B_T_E, layer["norm2"]).to(self.dtype)
            gate_up_B_T_F = layer["gate_up"](h_B_T_E)
            gate_B_T_I, up_B_T_I = gate_up_B_T_F.chunk(2, dim=-1)
            x_B_T_E = x_B_T_E + layer["down"](F.silu(gate_B_T_I) * up_B_T_I)
        self.filled = S
        last_B_E = self._norm(x_B_T_E[:, -1], self.final_norm).to(self.dtype)
        return self.head(last_B_E)

    @torch.no_grad()
    def prefill(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, pos_B_P: torch.Tensor) -> torch.Tensor:
        """Run the (left-padded) prompts; logits of each row's next token. Rows that repeat a prompt (several samples
        of one problem) are run once and their keys and values copied. A padding position attends only to itself,
        so no row of the cache holds NaN."""
        P = ids_B_P.shape[1]
        self.filled = 0
        rows_B_X = torch.cat([ids_B_P, mask_B_P.long()], dim=1)
        unique_U_X, inverse_B = torch.unique(rows_B_X, dim=0, return_inverse=True)
        ids_U_P, mask_U_P = unique_U_X[:, :P], unique_U_X[:, P:]
        pos_U_P = pos_B_P.new_zeros(ids_U_P.shape).index_copy_(0, inverse_B, pos_B_P)  # positions follow the mask
        causal_P_P = torch.ones(P, P, dtype=torch.bool, device=ids_B_P.device).tril()
        eye_P_P = torch.eye(P, dtype=torch.bool, device=ids_B_P.device)
        mask_U_1_P_P = (causal_P_P & mask_U_P.bool()[:, None, None, :]) | eye_P_P
        logits_U_V = self._forward(ids_U_P, pos_U_P, mask_U_1_P_P)
        if not torch.equal(inverse_B, torch.arange(len(inverse_B), device=inverse_B.device)):
            # (torch.unique sorts the rows) put each row's keys and values where that row is
            self.k_cache[:, :, :, :P] = self.k_cache[:, inverse_B, :, :P]
            self.v_cache[:, :, :, :P] = self.v_cache[:, inverse_B, :, :P]
        return logits_U_V[inverse_B]

    @torch.no_grad()
    def keep_rows(self, keep_N: torch.Tensor) -> None:
        """Keep only cache rows `keep_N` (indices into the rows decoded so far), moved to the front: later steps
        decode len(keep_N) rows, in that order."""
        S = self.filled
        self.k_cache[:, :len(keep_N), :, :S] = self.k_cache[:, keep_N, :, :S]
        self.v_cache[:, :len(keep_N), :, :S] = self.v_cache[:, keep_N, :, :S]

    @torch.no_grad()
    def decode(self, tok_B: torch.Tensor, pos_B_1: torch.Tensor, mask_B_S: torch.Tensor) -> torch.Tensor:
        """One token a row at positions `pos_B_1`; `mask_B_S` covers the cache filled so far plus this token."""
        return self._forward(tok_B[:, None], pos_B_1, mask_B_S.bool()[:, None, None, :])
