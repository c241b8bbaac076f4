"""A transformers VLM (LLaVA, PaliGemma, Idefics3 / SmolVLM) driven as a kvla VLA.

`HostVLA` gives CachedVLAPolicy, the bench and the methods what they read from kvla's own
reference VLA (`config`, `layout`, `language_model`, `policy_images`, `image_patches`,
`encode_images`, `prompt_embeddings`, `tokens_to_actions`), computed with the host's own modules:
its vision tower and projector (`get_image_features`), its token embeddings, its decoder and head.
What differs between hosts (pixel normalisation, the prompt template, the mask mode, where RoPE
positions start) is a `HostAdapter`, one small class per host in this package.

Actions follow OpenVLA's convention: `action_dim` autoregressive tokens, the last 256 ids of the
text vocabulary read as bins in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvla.engine import compat
from kvla.engine.layout import TokenLayout
from kvla.model.vla import ACTION_BINS, pixel_cells, resize_frames


@dataclass(frozen=True)
class HostConfig:
    """What a control step and the FLOP counter need to know about a host VLA."""

    host: str
    family: str  # the text decoder's model_type
    num_cameras: int
    image_size: int  # the policy's input side (square)
    cell_size: int  # the pixel cell each visual token covers
    tokens_per_image: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_text_tokens: int
    action_dim: int = 7
    mask_mode: str = "causal"
    vision_macs_per_sample: int | None = None  # measured once (torch's FLOP counter) for all cameras
    action_chunk: int = 1
    parallel_actions: bool = False
    proprio_dim: int = 0

    @property
    def num_action_tokens(self) -> int:
        return self.action_dim * self.action_chunk

    @property
    def num_visual(self) -> int:
        return self.num_cameras * self.tokens_per_image

    @property
    def patch_size(self) -> int:  # methods that read pixel cells see one per visual token
        return self.cell_size


class HostAdapter:
    """Per host: pixels the vision tower takes, the prompt template, its mask and positions."""

    name = "host"
    pixel_mean = (0.5, 0.5, 0.5)
    pixel_std = (0.5, 0.5, 0.5)
    mask_mode = "causal"
    position_offset = 0

    def __init__(self, host: torch.nn.Module):
        self.host = host
        self.image_token_id = int(host.config.image_token_id)
        text = host.config.get_text_config()
        self.bos_token_id = text.bos_token_id if text.bos_token_id is not None else 1

    def image_size(self) -> int:
        return int(self.host.config.vision_config.image_size)

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def cell_size(self) -> int:
        raise NotImplementedError

    def normalise(self, policy_images: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """uint8 [B, cameras, S, S, 3] -> float [B * cameras, 3, S, S] as the host's image processor
        leaves them (rescaled to [0, 1], normalised by the processor's mean and std)."""
        batch, cams, size = policy_images.shape[:3]
        pixels = policy_images.to(device).permute(0, 1, 4, 2, 3).reshape(batch * cams, 3, size, size).float() / 255.0
        mean = torch.tensor(self.pixel_mean, device=device)[:, None, None]
        std = torch.tensor(self.pixel_std, device=device)[:, None, None]
        return ((pixels - mean) / std).to(dtype)

    def pixel_values(self, policy_images: torch.Tensor, dtype, device) -> torch.Tensor:
        """What the host's forward takes as pixel_values."""
        return self.normalise(policy_images, dtype, device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B * cameras, tokens, hidden] from the host's own get_image_features."""
        return compat.host_image_features(self.host, pixel_values)

    def prompt(self, num_cameras: int, num_text: int) -> tuple[list, TokenLayout]:
        """The prompt template: a list of token ids with None for text slots, and the layout."""
        raise NotImplementedError

    def forward_arguments(self, input_ids: torch.Tensor) -> dict:
        """Extra arguments the host's own forward and generate need for this prompt (references)."""
        return {}


class HostVLA(torch.nn.Module):
    """A transformers VLM as a kvla VLA: `CachedVLAPolicy(HostVLA(host, adapter), "vla_cache")`."""

    def __init__(self, host: torch.nn.Module, adapter: HostAdapter, *, num_cameras: int = 1,
                 num_text_tokens: int = 16, action_dim: int = 7, mask_mode: str | None = None):
        super().__init__()
        self.host = host
        self.adapter = adapter
        self.language_model = compat.host_language_model(host)
        text = self.language_model.config
        if text.vocab_size < ACTION_BINS + 8:
            raise ValueError(f"the text vocabulary ({text.vocab_size}) is too small for {ACTION_BINS} action bins")
        template, layout = adapter.prompt(num_cameras, num_text_tokens)
        layout = dataclasses.replace(layout, num_action_tokens=action_dim)
        if mask_mode is not None:  # e.g. SmolVLA's bidirectional prefix over a causal SmolVLM
            layout = layout.with_mask_mode(mask_mode)
        self.template = template
        self.layout = layout
        first = self.language_model.model.layers[0].self_attn
        self.config = HostConfig(
            host=adapter.name, family=text.model_type, num_cameras=num_cameras, image_size=adapter.image_size(),
            cell_size=adapter.cell_size(), tokens_per_image=adapter.tokens_per_image(),
            hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads, head_dim=first.head_dim, vocab_size=text.vocab_size,
            num_text_tokens=num_text_tokens, action_dim=action_dim, mask_mode=layout.mask_mode,
        )

    # ---------------------------------------------------------- what a control step reads
    def policy_images(self, images: torch.Tensor) -> torch.Tensor:
        return resize_frames(images, self.config.num_cameras, self.config.image_size)

    def image_patches(self, policy_images: torch.Tensor) -> torch.Tensor:
        return pixel_cells(policy_images, self.config.cell_size)

    def _device_dtype(self):
        weight = self.language_model.lm_head.weight
        return weight.dtype, weight.device

    def pixel_values(self, policy_images: torch.Tensor) -> torch.Tensor:
        dtype, device = self._device_dtype()
        return self.adapter.pixel_values(policy_images, dtype, device)

    def encode_images(self, policy_images: torch.Tensor) -> torch.Tensor:
        """Visual token embeddings [B, cameras * tokens, hidden] from the host's vision tower."""
        batch = policy_images.shape[0]
        features = self.adapter.image_features(self.pixel_values(policy_images))
        return features.reshape(batch, -1, features.shape[-1])

    def prompt_ids(self, text_ids: torch.Tensor) -> torch.Tensor:
        """The whole prompt's token ids [B, seq_len]: the template with the text filled in (what
        the host's own forward takes as input_ids)."""
        batch = text_ids.shape[0]
        ids = torch.tensor([0 if t is None else t for t in self.template], device=text_ids.device).repeat(batch, 1)
        ids[:, slice(*self.layout.text_span)] = text_ids
        return ids

    def prompt_embeddings(self, visual: torch.Tensor, text_ids: torch.Tensor, proprio=None) -> torch.Tensor:
        """The host's token embeddings of the prompt with the visual features at the image tokens."""
        if proprio is not None:
            raise ValueError(f"the {self.adapter.name} host takes no proprio")
        ids = self.prompt_ids(text_ids.to(visual.device))
        embeds = self.language_model.get_input_embeddings()(ids)
        embeds[:, self.layout.visual_positions.to(visual.device)] = visual.to(embeds.dtype)
        return embeds

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        bins = (self.config.vocab_size - 1 - tokens).clamp(0, ACTION_BINS - 1).float()
        return (bins + 0.5) / ACTION_BINS * 2.0 - 1.0

    def forward_arguments(self, input_ids: torch.Tensor) -> dict:
        return self.adapter.forward_arguments(input_ids)
