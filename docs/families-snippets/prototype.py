"""Prototype of the per-family spec: a full prefill through kvla's cache layer with per-layer masks and RoPE,
plus query recomputation for statistics, against the model's own forward and eager attention maps."""
import sys, warnings, torch, transformers
warnings.filterwarnings("ignore")
sys.path.insert(0, "/work/main/src")
from kvla.engine import compat
from kvla.engine.cache import PositionalKVLayer
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM)
V = transformers.__version__
common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
W = 6
specs = {
 "llama": (LlamaConfig, LlamaForCausalLM, {}),
 "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=W)),
 "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
 "phi3": (Phi3Config, Phi3ForCausalLM, dict(partial_rotary_factor=0.5, sliding_window=W)),
 "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, sliding_window=W, query_pre_attn_scalar=16, attn_logit_softcapping=2.0)),
 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=16, sliding_window=W, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"] * 2)),
}

def layer_window(cfg, i):
    types = getattr(cfg, "layer_types", None)
    if types:
        return cfg.sliding_window if types[i] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)  # mistral, phi3: every layer

def rope_kind(cfg, rotary):
    import inspect
    return "layer_type" in inspect.signature(rotary.forward).parameters

def additive(allowed, dtype):
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

def queries(attn, x, heads, head_dim):
    if hasattr(attn, "qkv_proj"):
        q = torch.nn.functional.linear(x, attn.qkv_proj.weight[: heads * head_dim])
    else:
        q = attn.q_proj(x)
    q = q.view(*x.shape[:2], -1, head_dim)
    if hasattr(attn, "q_norm") and not NAIVE:
        q = attn.q_norm(q)
    return q.transpose(1, 2)

import os
NAIVE = os.environ.get("NAIVE") == "1"
for name, (cc, mc, extra) in specs.items():
    torch.manual_seed(0)
    cfg = cc(**common, **extra)
    lm = mc(cfg).eval()
    if name == "gemma2":
        lm.set_attn_implementation("eager")
    for layer in lm.model.layers:  # make the soft cap and the window matter
        (layer.self_attn.q_proj if hasattr(layer.self_attn, "q_proj") else layer.self_attn.qkv_proj).weight.data *= 4
    B, S = 2, 14
    embeds = torch.randn(B, S, 64)
    with torch.no_grad():
        ref = lm(inputs_embeds=embeds).logits
        impl = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        maps = lm(inputs_embeds=embeds, output_attentions=True).attentions
        lm.set_attn_implementation(impl)
    model = lm.model
    head_dim = lm.model.layers[0].self_attn.head_dim
    layers = [PositionalKVLayer(B, cfg.num_key_value_heads, S, head_dim, torch.float32, torch.device("cpu")) for _ in model.layers]
    cache = compat.make_cache(layers)
    pos = torch.arange(S)[None].expand(B, -1)
    q, k = pos[:, :, None], torch.arange(S)[None, None, :]
    per_type = rope_kind(cfg, model.rotary_emb)
    rope = ({t: model.rotary_emb(embeds, pos, t) for t in set(cfg.layer_types)} if per_type
            else {None: model.rotary_emb(embeds, position_ids=pos)})
    apply_rotary = sys.modules[type(model.layers[0].self_attn).__module__].apply_rotary_pos_emb
    h, worst_p = embeds, 0.0
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            win = None if NAIVE else layer_window(cfg, i)
            allowed = (k <= q) & ((k > q - win) if win else True)
            mask = additive(allowed, torch.float32)[:, None]
            cos, sin = rope[("full_attention" if NAIVE else cfg.layer_types[i]) if per_type else None]
            layers[i].write_slots = pos
            x_in = h
            h = compat.call_decoder_layer(layer, h, mask, pos, cache, (cos, sin))
            # statistics: recompute every query row of this layer
            attn = layer.self_attn
            qs = queries(attn, layer.input_layernorm(x_in), cfg.num_attention_heads, head_dim)
            qs, _ = apply_rotary(qs, qs, cos, sin)
            keys = layers[i].keys.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 1)
            scores = (qs @ keys.transpose(-1, -2)) * attn.scaling
            cap = getattr(attn, "attn_logit_softcapping", None) if name == "gemma2" else None  # only what the layer applies
            if cap is not None and not NAIVE:
                scores = torch.tanh(scores / cap) * cap
            probs = torch.softmax(scores + mask, -1)
            worst_p = max(worst_p, (probs - maps[i]).abs().max().item())
        logits = lm.lm_head(model.norm(h))
        final = getattr(cfg, "final_logit_softcapping", None)
        raw_err = (logits - ref).abs().max().item()
        if final is not None and not NAIVE:
            logits = torch.tanh(logits / final) * final
    print(("NAIVE " if NAIVE else "") + f"[{V}] {name:8s} windows={[layer_window(cfg, i) for i in range(4)]} per-type-rope={per_type} "
          f"logits err={(logits - ref).abs().max().item():.1e} (without final softcap {raw_err:.1e}) attn-prob err={worst_p:.1e}")
