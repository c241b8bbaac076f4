import warnings, torch, transformers
warnings.filterwarnings("ignore")
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig, GemmaConfig
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=16)
torch.manual_seed(0)
cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8), text_config=GemmaConfig(**TEXT),
                      image_token_id=299, projection_dim=64, hidden_size=64, vocab_size=300)
m = PaliGemmaForConditionalGeneration(cfg).eval()
ids = torch.cat([torch.full((1, 16), 299), torch.tensor([[1]]), torch.randint(3, 290, (1, 5))], 1)
pix = torch.randn(1, 3, 32, 32)
out = {}
for impl in ("sdpa", "eager"):
    m.set_attn_implementation(impl)
    with torch.no_grad():
        out[impl, "none"] = m(input_ids=ids, pixel_values=pix).logits
        out[impl, "prefix"] = m(input_ids=ids, pixel_values=pix, token_type_ids=torch.zeros_like(ids)).logits
        tt = torch.zeros_like(ids); tt[:, -3:] = 1
        out[impl, "suffix3"] = m(input_ids=ids, pixel_values=pix, token_type_ids=tt).logits
d = lambda a, b: f"{(out[a] - out[b]).abs().max().item():.2e}"
print(transformers.__version__, "sdpa none vs eager none", d(("sdpa", "none"), ("eager", "none")),
      "| eager none vs eager prefix", d(("eager", "none"), ("eager", "prefix")),
      "| sdpa none vs sdpa prefix", d(("sdpa", "none"), ("sdpa", "prefix")),
      "| eager prefix vs sdpa prefix", d(("eager", "prefix"), ("sdpa", "prefix")),
      "| eager suffix3 vs sdpa suffix3", d(("eager", "suffix3"), ("sdpa", "suffix3")))
