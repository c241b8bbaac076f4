"""Idefics3 / SmolVLM (SigLIP, pixel shuffle, a linear connector, a Llama text model), the VLM
SmolVLA is built on: [BOS, per camera <fake_token_around_image> <global-img> image tokens
<fake_token_around_image>, text]. Causal in transformers; SmolVLA attends bidirectionally over
images and language, which `HostVLA(..., mask_mode="prefix_lm")` declares.

Each camera is one image (no splitting into tiles); a visual token covers a (scale x patch)^2
pixel cell in raster order. An image whose pixel values are all exactly zero is taken by
transformers for padding and dropped; uint8 frames never normalise to exactly zero."""

from __future__ import annotations

from kvla.engine.layout import TokenLayout
from kvla.hosts.base import HostAdapter


class Idefics3Adapter(HostAdapter):
    name = "idefics3"
    fake_image_token_id = 49189  # SmolVLM's <fake_token_around_image>
    global_image_token_id = 49152  # SmolVLM's <global-img>

    def __init__(self, host, fake_image_token_id: int | None = None, global_image_token_id: int | None = None):
        super().__init__(host)
        if fake_image_token_id is not None:
            self.fake_image_token_id = fake_image_token_id
        if global_image_token_id is not None:
            self.global_image_token_id = global_image_token_id

    def tokens_per_image(self) -> int:
        return int(self.host.model.image_seq_len)

    def cell_size(self) -> int:
        return int(self.host.config.vision_config.patch_size * self.host.config.scale_factor)

    def pixel_values(self, policy_images, dtype, device):
        batch, cams = policy_images.shape[:2]
        pixels = self.normalise(policy_images, dtype, device)
        return pixels.reshape(batch, cams, *pixels.shape[1:])  # [B, images, 3, S, S]

    def prompt(self, num_cameras, num_text):
        n = self.tokens_per_image()
        template, spans = [self.bos_token_id], []
        for _ in range(num_cameras):
            template += [self.fake_image_token_id, self.global_image_token_id]
            spans.append((len(template), len(template) + n))
            template += [self.image_token_id] * n + [self.fake_image_token_id]
        text_start = len(template)
        template += [None] * num_text
        return template, TokenLayout(seq_len=len(template), visual_spans=tuple(spans),
                                     text_span=(text_start, text_start + num_text), bos_position=0)
