"""Tree attention (`opdlab.teacher.tree_attention`) against a naive forward per candidate.

Every leaf's next-token log-probs must equal those of a plain forward over (prompt, y_<t, v_k) with no padding, no
cache and no custom mask, to 1e-5 in fp32; the rollout's own hidden states must equal the ordinary scoring forward.
Checked for LlamaForCausalLM and Qwen2ForCausalLM (grouped-query attention, Qwen2's q/k/v biases), sdpa and eager,
left-padded prompts and right-padded completions of different lengths, one segment and many.

    python -m pytest tests/test_tree_attention.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opdlab.models.logprobs import completion_hidden
from opdlab.teacher.tree_attention import confidence_reward, leaf_confidence, student_candidates, tree_forward
from opdlab.types import Problem, Rollouts

torch.set_num_threads(1)

VOCAB, K = 37, 4
SIZE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny(arch: str, impl: str, seed: int = 0):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SIZE, attn_implementation=impl))
    if arch == "qwen2":  # random q/k/v biases, so the test sees them (they are zero at init)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.3)
    return model.eval()


def batch(seed: int = 0, prompt_lens=(5, 2, 4), completion_lens=(9, 13, 4), trigger_rate=0.4):
    """Left-padded prompts, right-padded completions, random triggers (only on completion tokens) and K distinct
    random leaf tokens per position."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = len(prompt_lens), max(prompt_lens), max(completion_lens)
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    comp_ids = torch.zeros(B, T, dtype=torch.long)
    comp_mask = torch.zeros(B, T, dtype=torch.long)
    for b, (p, t) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[b, P - p:] = torch.randint(1, VOCAB, (p,), generator=g)
        prompt_mask[b, P - p:] = 1
        comp_ids[b, :t] = torch.randint(1, VOCAB, (t,), generator=g)
        comp_mask[b, :t] = 1
    trigger = (torch.rand(B, T, generator=g) < trigger_rate) & comp_mask.bool()
    trigger[1, -1] = True  # the last position of the longest row
    leaves = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    return prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves


def naive_logp(model, prompt_ids, prompt_mask, comp_ids, b: int, t: int, token: int) -> torch.Tensor:
    """log pi(. | x, y_<t, token): one forward over the unpadded sequence."""
    seq = torch.cat([prompt_ids[b][prompt_mask[b].bool()], comp_ids[b, :t], torch.tensor([token])])
    with torch.no_grad():
        return F.log_softmax(model(input_ids=seq[None]).logits[0, -1].double(), dim=-1)


def log_probs_fn(model):
    return lambda h_n_H: F.log_softmax(model.get_output_embeddings()(h_n_H).double(), dim=-1)


@pytest.mark.parametrize("segment_len", [256, 3])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_equals_naive_forward_per_candidate(arch, impl, segment_len):
    model = tiny(arch, impl)
    prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves = batch()
    hidden, leaf_logp = tree_forward(model, prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves,
                                     log_probs_fn(model), segment_len=segment_len)
    assert leaf_logp.shape == (*trigger.shape, K, VOCAB)
    n = 0
    for b, t in trigger.nonzero().tolist():
        for k in range(K):
            ref = naive_logp(model, prompt_ids, prompt_mask, comp_ids, b, t, int(leaves[b, t, k]))
            torch.testing.assert_close(leaf_logp[b, t, k], ref, rtol=0, atol=1e-5)
            n += 1
    assert n >= 12
    assert torch.all(leaf_logp[~trigger] == 0)
    # the rollout's own hidden states: the same as the ordinary scoring forward, on completion tokens
    with torch.no_grad():
        plain = completion_hidden(model, prompt_ids, prompt_mask, comp_ids, comp_mask)
    m = comp_mask.bool()
    torch.testing.assert_close(hidden[m], plain[m], rtol=0, atol=1e-5)


def test_segments_do_not_change_the_result():
    """Many segments (with rows that have no trigger in some of them), and leaves split over several forwards,
    give what one segment and one leaf forward give, leaves and rollout."""
    model = tiny("llama", "sdpa", seed=3)
    args = batch(seed=5, prompt_lens=(3, 7, 1, 4), completion_lens=(20, 6, 17, 1), trigger_rate=0.25)
    one = tree_forward(model, *args, log_probs_fn(model), segment_len=1000)
    for seg, leaf_cache_tokens in ((1, 1 << 16), (4, 1 << 16), (7, 1), (1000, 30)):  # 1: a leaf row per forward
        many = tree_forward(model, *args, log_probs_fn(model), segment_len=seg, leaf_cache_tokens=leaf_cache_tokens)
        for x, y in zip(one, many):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_no_trigger_gives_zeros_and_the_plain_forward():
    model = tiny("qwen2", "sdpa")
    prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves = batch()
    hidden, out = tree_forward(model, prompt_ids, prompt_mask, comp_ids, comp_mask, torch.zeros_like(trigger),
                               leaves, log_probs_fn(model), segment_len=5)
    assert out.shape == (*trigger.shape, K, VOCAB) and not out.any()
    with torch.no_grad():
        plain = completion_hidden(model, prompt_ids, prompt_mask, comp_ids, comp_mask)
    torch.testing.assert_close(hidden[comp_mask.bool()], plain[comp_mask.bool()], rtol=0, atol=1e-5)


def test_leaf_confidence_and_rewards_match_the_naive_distribution():
    model = tiny("llama", "eager", seed=1)
    prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves = batch(seed=2)
    _, stats = tree_forward(model, prompt_ids, prompt_mask, comp_ids, comp_mask, trigger, leaves,
                            leaf_confidence(model.get_output_embeddings(), VOCAB, chunk_size=3), segment_len=4)
    for b, t in trigger.nonzero().tolist()[:4]:
        for k in range(K):
            logp = naive_logp(model, prompt_ids, prompt_mask, comp_ids, b, t, int(leaves[b, t, k]))
            p = logp.exp()
            ent = float(-(p * logp).sum())
            expected = {"max_p": float(p.max()), "sampled_p": float((p * p).sum()), "neg_entropy": -ent,
                        "perplexity": -torch.tensor(ent).exp().item()}
            for signal, value in expected.items():
                got = confidence_reward(stats[b, t, k], signal).item()
                # perplexity = exp(entropy): an fp32 rounding of the entropy grows by the perplexity itself (about
                # 15 here), so it also gets a relative tolerance; fp32 kernels differ between CPUs at that level
                assert got == pytest.approx(value, rel=5e-6, abs=1e-5), signal
    with pytest.raises(ValueError, match="unknown lookahead confidence signal 'maxp'"):
        confidence_reward(stats, "maxp")


def test_student_candidates_are_its_high_entropy_positions_and_top_k():
    model = tiny("llama", "sdpa", seed=4)
    prompt_ids, prompt_mask, comp_ids, comp_mask, _, _ = batch(seed=6)
    loss_mask = comp_mask.clone()
    loss_mask[0, 2] = 0  # a masked special token: never a trigger
    rollouts = Rollouts(prompt_ids_B_P=prompt_ids, prompt_mask_B_P=prompt_mask, completion_ids_B_T=comp_ids,
                        completion_mask_B_T=comp_mask, logp_old_B_T=torch.zeros(comp_ids.shape),
                        sampler_logp_B_T=torch.zeros(comp_ids.shape), problems=[Problem("a", "q", "0")] * 3,
                        texts=[""] * 3, loss_mask_B_T=loss_mask)
    with torch.no_grad():
        pos = (torch.cat([prompt_mask, comp_mask], 1).cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=torch.cat([prompt_ids, comp_ids], 1), attention_mask=torch.cat(
            [prompt_mask, comp_mask], 1), position_ids=pos).logits[:, prompt_ids.shape[1] - 1:-1].double()
    logp = F.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    values = entropy[loss_mask.bool()].unique()  # sorted; tau halfway between two of them, away from ties
    tau = float(values[len(values) // 2 - 1: len(values) // 2 + 1].mean())
    trigger, ids = student_candidates(model, rollouts, K, tau, VOCAB, chunk_size=5)
    assert torch.equal(trigger, (entropy > tau) & loss_mask.bool())
    assert 0 < trigger.sum() < loss_mask.sum()
    m = loss_mask.bool()
    assert torch.equal(ids[m].sort(-1).values, logp.topk(K, -1).indices[m].sort(-1).values)
    with pytest.raises(ValueError, match="top-K must be in"):
        student_candidates(model, rollouts, VOCAB + 1, tau, VOCAB)


def test_unsupported_models_are_refused_with_the_reason():
    model = tiny("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    args = batch()
    with pytest.raises(ValueError, match="attn_implementation"):
        tree_forward(model, *args, log_probs_fn(model))
    qwen = tiny("qwen2", "sdpa")
    qwen.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding_attention"):
        tree_forward(qwen, *args, log_probs_fn(qwen))
