import torch, transformers, warnings
warnings.filterwarnings("ignore")
from transformers import Gemma2Config, Gemma2ForCausalLM
torch.manual_seed(0)
cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=300, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0)
m = Gemma2ForCausalLM(cfg).eval()
for layer in m.model.layers:  # large q/k so the soft cap bites
    layer.self_attn.q_proj.weight.data *= 20
x = torch.randint(3, 300, (1, 20))
out = {}
for impl in ("eager", "sdpa"):
    try:
        m.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = m(x).logits
    except Exception as e:
        print(transformers.__version__, impl, "error:", type(e).__name__, str(e)[:100])
if len(out) == 2:
    print(transformers.__version__, "max |eager - sdpa| =", (out["eager"] - out["sdpa"]).abs().max().item())
