import warnings, torch, transformers
warnings.filterwarnings("ignore")
from transformers import (LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig, LlamaConfig,
                          PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig, GemmaConfig,
                          Idefics3Config, Idefics3ForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
hosts = {
 "llava": LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8), text_config=LlamaConfig(**TEXT), image_token_id=299)),
 "paligemma": PaliGemmaForConditionalGeneration(PaliGemmaConfig(vision_config=SiglipVisionConfig(hidden_size=32,
          intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
          text_config=GemmaConfig(**TEXT, head_dim=16), image_token_id=299, projection_dim=64, hidden_size=64, vocab_size=300)),
 "idefics3": Idefics3ForConditionalGeneration(Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64,
          num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8), text_config=LlamaConfig(**TEXT), image_token_id=299)),
 "qwen2-vl": Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=dict(TEXT, rope_parameters={"rope_type": "default",
          "rope_theta": 1e4, "mrope_section": [2, 3, 3]}), vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2,
          mlp_ratio=2, patch_size=4), image_token_id=299)),
}
for name, m in hosts.items():
    dec = getattr(m, "get_decoder", lambda: None)()
    print(transformers.__version__, f"{name:9s}", "get_decoder:", type(dec).__name__ if dec is not None else None,
          "| m.model children:", [n for n, _ in m.model.named_children()],
          "| lm_head:", hasattr(m, "lm_head"), "| image_token_id:", getattr(m.config, "image_token_id", None),
          "| tied:", m.config.tie_word_embeddings, "| text model_type:", m.config.get_text_config().model_type,
          "| attn:", m.config.get_text_config()._attn_implementation)
