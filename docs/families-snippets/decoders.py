import torch, transformers, warnings
warnings.filterwarnings("ignore")
from transformers import (MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Gemma2Config, Gemma2ForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM)
print("transformers", transformers.__version__)
common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
specs = {
 "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=8)),
 "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
 "phi3": (Phi3Config, Phi3ForCausalLM, dict(partial_rotary_factor=0.5)),
 "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, layer_types=["sliding_attention","full_attention"]*2)),
}
for name, (cc, mc, extra) in specs.items():
    torch.manual_seed(0)
    cfg = cc(**common, **extra)
    m = mc(cfg).eval()
    layer = m.model.layers[0]
    attn = layer.self_attn
    print(f"== {name}: model_type={cfg.model_type} attn_impl={cfg._attn_implementation} layer_types={getattr(cfg,'layer_types',None)}")
    print("   sliding_window", getattr(cfg, "sliding_window", None), "softcap", getattr(cfg, "attn_logit_softcapping", None),
          "final_softcap", getattr(cfg, "final_logit_softcapping", None), "rope_parameters", getattr(cfg, "rope_parameters", None))
    print("   layer children", [n for n, _ in layer.named_children()])
    print("   attn children", [n for n, _ in attn.named_children()], "scaling", attn.scaling, "head_dim", attn.head_dim,
          "attn.sliding_window", getattr(attn, "sliding_window", "n/a"))
    print("   backbone children", [n for n, _ in m.model.named_children()], "rotary fwd args",
          list(__import__("inspect").signature(m.model.rotary_emb.forward).parameters))
    x = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        try:
            out = m(x).logits
            print("   forward ok", tuple(out.shape))
        except Exception as e:
            print("   forward error", type(e).__name__, str(e)[:150])
