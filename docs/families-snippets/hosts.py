"""Tiny random-weight VLM hosts: construct, full forward, and the adapter recipe (embeds -> decoder -> head) agree."""
import time, warnings, torch, transformers
warnings.filterwarnings("ignore")
from transformers import (LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig, LlamaConfig, Qwen2Config,
                          PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig, GemmaConfig,
                          Idefics3Config, Idefics3ForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
V = transformers.__version__
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMG = 299

def decoder(m):  # the language decoder module, the head
    return m.model.language_model if hasattr(m.model, "language_model") else m.model.text_model

def report(name, m, ids, full_logits, embeds, positions, mask=None):
    dec = decoder(m)
    with torch.no_grad():
        h = dec(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).last_hidden_state
        logits = m.lm_head(h)
        final = getattr(m.config.get_text_config(), "final_logit_softcapping", None)
        if final is not None:
            logits = torch.tanh(logits / final) * final
    n_img = int((ids == IMG).sum(1)[0])
    print(f"[{V}] {name:10s} decoder={type(dec).__name__:18s} layers={len(dec.layers)} image_tokens/sample={n_img:3d} "
          f"seq={ids.shape[1]} adapter-vs-model max|dlogit|={(logits - full_logits).abs().max().item():.2e}")

t0 = time.time()
# ---- LLaVA with Llama and with Qwen2 language models
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)
for text_name, text in (("llama", LlamaConfig(**TEXT)), ("qwen2", Qwen2Config(**TEXT))):
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    m = LlavaForConditionalGeneration(cfg).eval()
    n = (32 // 8) ** 2  # CLS dropped by the "default" strategy
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n), IMG), torch.randint(3, 290, (1, 5))], 1).repeat(2, 1)
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = m(input_ids=ids, pixel_values=pix).logits
        feats = torch.cat(list(m.model.get_image_features(pixel_values=pix, vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output), 0)
        emb = m.model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], feats)
    report("llava-" + text_name, m, ids, full, emb, torch.arange(ids.shape[1])[None].expand(2, -1))

# ---- PaliGemma (Gemma): [image tokens, BOS, prompt], prefix-LM over the whole prompt, positions 1-based
torch.manual_seed(0)
cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=GemmaConfig(**TEXT, head_dim=16), image_token_id=IMG, projection_dim=64, hidden_size=64,
                      vocab_size=300)
m = PaliGemmaForConditionalGeneration(cfg).eval()
n = cfg.text_config.num_image_tokens
ids = torch.cat([torch.full((1, n), IMG), torch.tensor([[1]]), torch.randint(3, 290, (1, 5))], 1).repeat(2, 1)
tt = torch.zeros_like(ids)  # all prefix: what generate() sees for a prompt without suffix
pix = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    full = m(input_ids=ids, pixel_values=pix, token_type_ids=tt).logits
    causal_full = m(input_ids=ids, pixel_values=pix).logits
    feats = m.model.get_image_features(pix).pooler_output
    emb = m.model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], feats)
L = ids.shape[1]
bidir = torch.zeros(2, 1, L, L)  # additive: prefix attends everywhere in the prefix
report("paligemma", m, ids, full, emb, torch.arange(L)[None].expand(2, -1) + 1, bidir)
print(f"    paligemma prefix-LM vs causal max|dlogit| = {(full - causal_full).abs().max().item():.2e}; "
      f"text use_bidirectional_attention={cfg.text_config.use_bidirectional_attention}")

# ---- Idefics3 / SmolVLM: model.text_model (Llama), pixel shuffle -> image_seq_len tokens per image
torch.manual_seed(0)
cfg = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     image_size=64, patch_size=8), text_config=LlamaConfig(**TEXT), image_token_id=IMG, scale_factor=2)
m = Idefics3ForConditionalGeneration(cfg).eval()
n = m.model.image_seq_len  # (64/8)^2 / 2^2 = 16
ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, n), IMG), torch.tensor([[5]]), torch.randint(3, 290, (1, 5))], 1).repeat(2, 1)
pix = torch.rand(2, 1, 3, 64, 64) + 0.1  # [B, images, C, H, W]; an all-zero image counts as padding
with torch.no_grad():
    full = m(input_ids=ids, pixel_values=pix).logits
    po = m.model.get_image_features(pix).pooler_output
    feats = torch.cat(list(po), 0) if isinstance(po, (list, tuple)) else po.reshape(-1, po.shape[-1])
    emb = m.model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], feats)
report("idefics3", m, ids, full, emb, torch.arange(ids.shape[1])[None].expand(2, -1))
print(f"    idefics3 pooler_output type={type(po).__name__}")

# ---- Qwen2-VL and Qwen2.5-VL: mrope (3, B, L) positions from get_rope_index
for name, Cfg, Model, vis in (
    ("qwen2-vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration,
     dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)),
    ("qwen2.5-vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
     dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
          temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])),
):
    torch.manual_seed(0)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = Cfg(text_config=text, vision_config=vis, image_token_id=IMG, vision_start_token_id=297, vision_end_token_id=298,
              video_token_id=296)
    m = Model(cfg).eval()
    grid = torch.tensor([[1, 8, 12]])  # t, h, w in patches -> (8/2)*(12/2) = 24 tokens
    n = int(grid.prod() // 4)
    ids = torch.cat([torch.tensor([[1, 297]]), torch.full((1, n), IMG), torch.tensor([[298]]), torch.randint(3, 290, (1, 5))], 1).repeat(2, 1)
    mm = (ids == IMG).int()
    grids = grid.repeat(2, 1)
    pix = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4)
    with torch.no_grad():
        full = m(input_ids=ids, pixel_values=pix, image_grid_thw=grids, mm_token_type_ids=mm).logits
        pos, deltas = m.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grids)
        feats = torch.cat(list(m.model.get_image_features(pix, grids).pooler_output), 0)
        emb = m.model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], feats)
    report(name, m, ids, full, emb, pos)
    print(f"    {name} positions {tuple(pos.shape)} text after image starts at {pos[:, 0, n + 3].tolist()} "
          f"(slot {n + 3}); rope_delta={deltas[0].item()}; mrope_section={cfg.text_config.rope_parameters['mrope_section']}")
print(f"[{V}] total {time.time() - t0:.1f}s")
