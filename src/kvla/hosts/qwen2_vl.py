"""Qwen2-VL and Qwen2.5-VL (a ViT over 14 px patches of two duplicated frames, a 2x2 patch merger,
a Qwen2 language model with multimodal RoPE): [BOS, per camera <|vision_start|> image tokens
<|vision_end|>, text], causal.

Under multimodal RoPE a position is not a slot index: an image token's position has a temporal,
a height and a width component, and the text after an image resumes at the image's start plus
its larger grid side. The layout takes each slot's components from the host's own
`get_rope_index`, so the cache keeps them. The policy's frames are square and of a fixed size,
so the grid, and with it the layout, is the same at every step."""

from __future__ import annotations

import torch

from kvla.engine import compat
from kvla.engine.layout import LayoutError, TokenLayout
from kvla.hosts.base import HostAdapter


class Qwen2VLAdapter(HostAdapter):
    name = "qwen2_vl"
    # Qwen2-VL's image processor normalisation (CLIP's)
    pixel_mean = (0.48145466, 0.4578275, 0.40821073)
    pixel_std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, host, image_size: int | None = None):
        super().__init__(host)
        vision = host.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.side = image_size or 16 * self.patch * self.merge // 2  # 224 px at Qwen2-VL's 14 px patches
        if self.side % (self.patch * self.merge):
            raise LayoutError(f"image_size {self.side} must be a multiple of patch x merge = {self.patch * self.merge}")
        self.grid = self.side // self.patch  # patches per side
        self.vision_start = int(host.config.vision_start_token_id)
        self.vision_end = int(host.config.vision_end_token_id)

    def image_size(self) -> int:
        return self.side

    def tokens_per_image(self) -> int:
        return (self.grid // self.merge) ** 2

    def cell_size(self) -> int:
        return self.patch * self.merge

    def grid_thw(self, images: int, device=None) -> torch.Tensor:
        return torch.tensor([[1, self.grid, self.grid]] * images, device=device)

    def pixel_values(self, policy_images, dtype, device):
        """Flattened patches [images * grid^2, 3 * temporal * patch^2] in the order Qwen2-VL's image
        processor writes them: each image repeated over the temporal patch, patches grouped by
        merge window."""
        pixels = self.normalise(policy_images, torch.float32, device)  # [N, 3, S, S]
        images, g, m, p, t = pixels.shape[0], self.grid, self.merge, self.patch, self.temporal
        frames = pixels[:, None].expand(-1, t, -1, -1, -1)  # [N, t, 3, S, S]
        x = frames.reshape(images, t, 3, g // m, m, p, g // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # N, gh/m, gw/m, m, m, C, t, p, p
        return x.reshape(images * g * g, 3 * t * p * p).to(dtype)

    def image_features(self, pixel_values):
        images = pixel_values.shape[0] // (self.grid * self.grid)
        return compat.host_image_features(self.host, pixel_values, image_grid_thw=self.grid_thw(images, pixel_values.device))

    def prompt(self, num_cameras, num_text):
        n = self.tokens_per_image()
        template, spans = [self.bos_token_id], []
        for _ in range(num_cameras):
            template.append(self.vision_start)
            spans.append((len(template), len(template) + n))
            template += [self.image_token_id] * n + [self.vision_end]
        text_start = len(template)
        template += [None] * num_text
        ids = torch.tensor([[0 if t is None else t for t in template]])
        positions = compat.multimodal_rope_positions(self.host, ids, ids == self.image_token_id,
                                                     self.grid_thw(num_cameras))
        layout = TokenLayout(seq_len=len(template), visual_spans=tuple(spans), text_span=(text_start, text_start + num_text),
                             bos_position=0, rope_positions=tuple(tuple(row) for row in positions[:, 0].tolist()),
                             next_rope_position=int(positions.max()) + 1)
        return template, layout

    def forward_arguments(self, input_ids):
        images = int((input_ids == self.image_token_id).sum()) // self.tokens_per_image()
        return {"image_grid_thw": self.grid_thw(images, input_ids.device),
                "mm_token_type_ids": (input_ids == self.image_token_id).int()}
