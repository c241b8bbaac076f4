"""LLaVA (CLIP vision, a two-layer projector, a Llama or Qwen2 language model): [BOS, image
tokens per camera, text], causal, positions from 0."""

from __future__ import annotations

from kvla.engine import compat
from kvla.engine.layout import TokenLayout
from kvla.hosts.base import HostAdapter


class LlavaAdapter(HostAdapter):
    name = "llava"
    # CLIP's image processor normalisation
    pixel_mean = (0.48145466, 0.4578275, 0.40821073)
    pixel_std = (0.26862954, 0.26130258, 0.27577711)

    def tokens_per_image(self) -> int:
        vision = self.host.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        # the "default" strategy drops CLS; "full" keeps it
        return patches + (1 if self.host.config.vision_feature_select_strategy == "full" else 0)

    def cell_size(self) -> int:
        if self.host.config.vision_feature_select_strategy == "full":
            raise compat.UnsupportedModelError("LLaVA with vision_feature_select_strategy='full' has a CLS token per "
                                               "image, which covers no pixel cell: use 'default'")
        return int(self.host.config.vision_config.patch_size)

    def image_features(self, pixel_values):
        return compat.host_image_features(self.host, pixel_values, **compat.llava_feature_arguments(self.host.config))

    def prompt(self, num_cameras, num_text):
        n = self.tokens_per_image()
        template = [self.bos_token_id] + [self.image_token_id] * (n * num_cameras) + [None] * num_text
        spans = tuple((1 + c * n, 1 + (c + 1) * n) for c in range(num_cameras))
        text_start = 1 + n * num_cameras
        return template, TokenLayout(seq_len=len(template), visual_spans=spans,
                                     text_span=(text_start, text_start + num_text), bos_position=0)
