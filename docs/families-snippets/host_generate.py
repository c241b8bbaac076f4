import warnings, torch, transformers
warnings.filterwarnings("ignore")
from transformers import (PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig, GemmaConfig,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)
V = transformers.__version__
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
def manual(m, ids, extra_fn, steps):
    toks = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = m(input_ids=ids, **extra_fn(ids)).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt); ids = torch.cat([ids, nxt], 1)
    return torch.cat(toks, 1)
torch.manual_seed(0)
cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8), text_config=GemmaConfig(**TEXT, head_dim=16),
                      image_token_id=299, projection_dim=64, hidden_size=64, vocab_size=300)
m = PaliGemmaForConditionalGeneration(cfg).eval()
ids = torch.cat([torch.full((2, 16), 299), torch.ones(2, 1, dtype=torch.long), torch.randint(3, 290, (2, 5))], 1)
pix = torch.randn(2, 3, 32, 32)
tt = torch.zeros_like(ids)
g = m.generate(input_ids=ids, pixel_values=pix, token_type_ids=tt, attention_mask=torch.ones_like(ids),
               max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
P = ids.shape[1]
ref = manual(m, ids, lambda x: dict(pixel_values=pix, token_type_ids=torch.cat([tt, torch.ones(2, x.shape[1] - P, dtype=torch.long)], 1)), 5)
print(V, "paligemma generate == manual greedy (suffix tokens type 1):", torch.equal(g, ref))
torch.manual_seed(0)
text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                    patch_size=4, spatial_merge_size=2, temporal_patch_size=2), image_token_id=299,
                    vision_start_token_id=297, vision_end_token_id=298, video_token_id=296)
m = Qwen2VLForConditionalGeneration(cfg).eval()
grid = torch.tensor([[1, 8, 12]] * 2)
ids = torch.cat([torch.tensor([[1, 297]] * 2), torch.full((2, 24), 299), torch.tensor([[298]] * 2), torch.randint(3, 290, (2, 5))], 1)
pix = torch.randn(int(grid.prod(-1).sum()), 96)
mm = (ids == 299).int()
g = m.generate(input_ids=ids, pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=mm, attention_mask=torch.ones_like(ids),
               max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
P = ids.shape[1]
ref = manual(m, ids, lambda x: dict(pixel_values=pix, image_grid_thw=grid,
             mm_token_type_ids=torch.cat([mm, torch.zeros(2, x.shape[1] - P, dtype=mm.dtype)], 1)), 5)
print(V, "qwen2-vl generate == manual greedy:", torch.equal(g, ref))
