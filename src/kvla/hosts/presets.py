"""Hub-free VLM hosts from their public config numbers, for `kvla bench latency --model NAME`.

Weights are random (no hub here); the shapes are the published ones, so the latency and FLOPs a
method saves on them are those of the architecture. The `:cpu` sizes keep each host's widths and
token counts but fewer layers (and, for SmolVLM, a 256 px SigLIP input with pixel-shuffle 2, which
gives the same 64 tokens per camera as 512 px with 4), to fit a 2-core CPU; run the full sizes
on a GPU. Check the numbers against the hub's config.json before quoting a figure for a real model.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers as T

from kvla.hosts import wrap
from kvla.hosts.base import HostVLA


def _smolvlm(text_layers: int, vision_layers: int, image_size: int, scale_factor: int, tiny: bool = False):
    if tiny:
        text = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=600, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=64, patch_size=8)
        return T.Idefics3ForConditionalGeneration(T.Idefics3Config(vision_config=vision, text_config=text,
                                                                   image_token_id=3, scale_factor=2)), \
            {"fake_image_token_id": 4, "global_image_token_id": 5}
    # SmolVLM2-500M: SmolLM2-360M text, SigLIP-B/16
    text = T.LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=text_layers, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49280, rope_theta=100000.0, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=vision_layers, num_attention_heads=12,
                  image_size=image_size, patch_size=16)
    return T.Idefics3ForConditionalGeneration(T.Idefics3Config(vision_config=vision, text_config=text,
                                                               image_token_id=49190, scale_factor=scale_factor)), {}


def _paligemma(text_layers: int, vision_layers: int, tiny: bool = False):
    if tiny:
        text = T.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=600, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8)
        return T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            vision_config=vision, text_config=text, image_token_id=3, projection_dim=64, hidden_size=64,
            vocab_size=600)), {"separator_token_id": 6}
    # PaliGemma-3B-224: Gemma-2B text, SigLIP So400m/14 at 224 px (256 tokens)
    text = T.GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=text_layers, num_attention_heads=8,
                         num_key_value_heads=1, head_dim=256, vocab_size=257216, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0)
    vision = T.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers,
                                  num_attention_heads=16, image_size=224, patch_size=14)
    return T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_id=257152, projection_dim=2048, hidden_size=2048,
        vocab_size=257216)), {}


# name -> (builder, HostVLA options); SmolVLA reads its VLM's first 16 layers, bidirectionally over the prefix
HOST_PRESETS = {
    "smolvlm:tiny": (lambda: _smolvlm(0, 0, 0, 0, tiny=True), {}),
    "smolvla:cpu": (lambda: _smolvlm(16, 4, 256, 2), {"mask_mode": "prefix_lm"}),
    "smolvla": (lambda: _smolvlm(16, 12, 512, 4), {"mask_mode": "prefix_lm"}),
    "paligemma:tiny": (lambda: _paligemma(0, 0, tiny=True), {}),
    "paligemma:cpu": (lambda: _paligemma(4, 6), {}),
    "paligemma:3b": (lambda: _paligemma(18, 27), {}),
}


def count_vision_macs(vla: HostVLA) -> int:
    """MACs of the host's vision path (tower, connector) for one sample, all cameras, counted by
    torch's FLOP counter on its own forward (eager attention, which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    side = vla.config.image_size
    frames = torch.zeros(1, vla.config.num_cameras, side, side, 3, dtype=torch.uint8) + 100
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        vla.encode_images(frames)
    return counter.get_total_flops() // 2


def host_preset(name: str, *, seed: int = 0, num_text_tokens: int = 28, action_dim: int = 7,
                num_cameras: int = 1) -> HostVLA:
    """A host VLA of a preset shape with random weights, its vision MACs counted once."""
    if name not in HOST_PRESETS:
        raise ValueError(f"unknown host model {name!r}; choose from {', '.join(HOST_PRESETS)}")
    builder, options = HOST_PRESETS[name]
    torch.manual_seed(seed)
    host, adapter_options = builder()
    vla = wrap(host.eval(), adapter_options=adapter_options, num_cameras=num_cameras, num_text_tokens=num_text_tokens,
               action_dim=action_dim, **options)
    vla.config = dataclasses.replace(vla.config, vision_macs_per_sample=count_vision_macs(vla))
    return vla
