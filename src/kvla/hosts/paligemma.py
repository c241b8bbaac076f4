"""PaliGemma (SigLIP, a linear projector, Gemma): [image tokens per camera, BOS, text, separator],
the whole prompt one bidirectional prefix (decoded tokens causal), RoPE positions from 1.

transformers decides PaliGemma's prefix from token_type_ids (0: prefix); without them sdpa runs
the prompt bidirectionally and eager causally. kvla always declares the prefix, and the references
in tests pass token_type_ids, so neither path is taken by accident."""

from __future__ import annotations

import torch

from kvla.engine.layout import TokenLayout
from kvla.hosts.base import HostAdapter


class PaliGemmaAdapter(HostAdapter):
    name = "paligemma"
    mask_mode = "prefix_lm"
    position_offset = 1
    separator_token_id = 108  # Gemma's "\n", which PaliGemma's processor appends to the prompt

    def __init__(self, host, separator_token_id: int | None = None):
        super().__init__(host)
        if separator_token_id is not None:
            self.separator_token_id = separator_token_id

    def tokens_per_image(self) -> int:
        vision = self.host.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def cell_size(self) -> int:
        return int(self.host.config.vision_config.patch_size)

    def prompt(self, num_cameras, num_text):
        n = self.tokens_per_image()
        images = n * num_cameras
        template = [self.image_token_id] * images + [self.bos_token_id] + [None] * num_text + [self.separator_token_id]
        spans = tuple((c * n, (c + 1) * n) for c in range(num_cameras))
        layout = TokenLayout(seq_len=len(template), visual_spans=spans, text_span=(images + 1, images + 1 + num_text),
                             bos_position=images, position_offset=self.position_offset)
        return template, layout.with_mask_mode("prefix_lm")

    def forward_arguments(self, input_ids):
        return {"token_type_ids": torch.zeros_like(input_ids)}  # the whole prompt is the prefix
