"""A VLA-shaped model: patch ViT -> projector -> Hugging Face decoder -> action tokens.

The shape follows OpenVLA: one visual token per image patch placed right after BOS, the
instruction, then action tokens decoded autoregressively (or all action positions in one pass,
as OpenVLA-OFT); each action dimension is discretised into 256 bins that are the last 256
entries of the vocabulary. Presets build it with random weights for tests and timing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvla.engine.layout import TokenLayout
from kvla.model.inputs import ImageError

ACTION_BINS = 256
BOS_TOKEN_ID = 1

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
}


@dataclass(frozen=True)
class VLAConfig:
    image_size: int = 224
    patch_size: int = 14
    num_cameras: int = 1
    vision_dim: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    vision_mlp: int = 1536
    family: str = "llama"
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 16
    vocab_size: int = 32064
    num_text_tokens: int = 28
    action_dim: int = 7  # action dimensions per control step
    action_chunk: int = 1  # control steps predicted at once (OFT-style chunks need parallel_actions)
    parallel_actions: bool = False
    proprio_dim: int = 0  # robot state fed as one proprio token after the visual tokens (0: none)
    mask_mode: str = "causal"  # the prompt's attention: causal (OpenVLA), prefix_lm (PaliGemma), bidirectional (OFT)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visual(self) -> int:
        return self.num_cameras * self.patches_per_image

    @property
    def num_action_tokens(self) -> int:
        return self.action_dim * self.action_chunk

    def layout(self) -> TokenLayout:
        return TokenLayout.single_prompt(
            num_visual=self.patches_per_image, num_text=self.num_text_tokens, num_cameras=self.num_cameras,
            num_proprio=1 if self.proprio_dim else 0, num_action_tokens=self.num_action_tokens,
            parallel_actions=self.parallel_actions, mask_mode=self.mask_mode,
        )

    def decoder_config(self):
        config_cls, _ = _FAMILIES[self.family]
        extra = {"head_dim": self.hidden_size // self.num_heads} if self.family == "gemma" else {}
        return config_cls(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, vocab_size=self.vocab_size,
            max_position_embeddings=4096, bos_token_id=BOS_TOKEN_ID, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False, **extra,
        )


PRESETS: dict[str, VLAConfig] = {
    "tiny": VLAConfig(image_size=32, patch_size=8, vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                      vocab_size=512, num_text_tokens=6),
    "small": VLAConfig(vision_dim=256, vision_layers=4, vision_heads=4, vision_mlp=1024,
                       hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8),
    "base": VLAConfig(),
    # OpenVLA-7B: Llama-2-7B decoder (vocabulary 32064), 256 visual tokens at 224 px / 14 px patches.
    # The vision tower stands in for Prismatic's fused DINOv2-L + SigLIP-So400m with one ViT-L.
    "openvla-7b": VLAConfig(vision_dim=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                            hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),
}


def preset_config(name: str, **overrides) -> VLAConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def resize_frames(images: torch.Tensor, num_cameras: int, size: int) -> torch.Tensor:
    """Camera frames (uint8 [B, H, W, 3] or [B, cameras, H, W, 3]) -> uint8 [B, cameras, size, size, 3]
    (antialiased bilinear resize where the frames are another size)."""
    if images.dtype != torch.uint8:
        raise ImageError(f"camera frames must be uint8 RGB, got {images.dtype}")
    if images.dim() == 4:
        images = images[:, None]
    if images.dim() != 5 or images.shape[-1] != 3:
        raise ImageError(f"camera frames must be [B, H, W, 3] or [B, cameras, H, W, 3], got {tuple(images.shape)}")
    if images.shape[1] != num_cameras:
        raise ImageError(f"model expects {num_cameras} camera(s), got {images.shape[1]}")
    if images.shape[2:4] != (size, size):
        batch, cams, height, width, _ = images.shape
        flat = images.reshape(batch * cams, height, width, 3).permute(0, 3, 1, 2).float()
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = flat.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(batch, cams, size, size, 3)
    return images


def pixel_cells(policy_images: torch.Tensor, cell: int) -> torch.Tensor:
    """The pixel cell each visual token covers, flattened: [B, cameras * cells, 3 * cell * cell] (float32),
    cameras in order, cells in raster order."""
    batch, cams, height, width, _ = policy_images.shape
    if height % cell or width % cell:
        raise ImageError(f"image size {height}x{width} is not a multiple of the patch size {cell} (the pixel cell of a visual token)")
    x = policy_images.float().reshape(batch, cams, height // cell, cell, width // cell, cell, 3)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(batch, cams * (height // cell) * (width // cell), -1)


class _VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchViT(nn.Module):
    """A plain ViT: one output token per image patch."""

    def __init__(self, config: VLAConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, config.vision_dim, config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.randn(1, config.patches_per_image, config.vision_dim) * 0.02)
        self.blocks = nn.ModuleList(
            _VisionBlock(config.vision_dim, config.vision_heads, config.vision_mlp) for _ in range(config.vision_layers)
        )
        self.norm = nn.LayerNorm(config.vision_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VLAModel(nn.Module):
    """Vision encoder + projector + causal LM; exposes the pieces a control step needs."""

    def __init__(self, config: VLAConfig):
        super().__init__()
        if config.family not in _FAMILIES:
            raise ValueError(f"unsupported decoder family {config.family!r}; choose from {', '.join(_FAMILIES)}")
        if config.image_size % config.patch_size:
            raise ImageError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if config.action_chunk > 1 and not config.parallel_actions:
            raise ValueError("action chunks are decoded in parallel: set parallel_actions=True")
        self.config = config
        self.vision = PatchViT(config)
        self.projector = nn.Sequential(
            nn.Linear(config.vision_dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.proprio_projector = nn.Linear(config.proprio_dim, config.hidden_size) if config.proprio_dim else None
        _, lm_cls = _FAMILIES[config.family]
        self.language_model = lm_cls(config.decoder_config())
        self.layout = config.layout()

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **overrides) -> "VLAModel":
        torch.manual_seed(seed)
        return cls(preset_config(name, **overrides)).eval()

    def describe(self) -> dict:
        return asdict(self.config)

    # -------------------------------------------------------------- inputs
    def policy_images(self, images: torch.Tensor) -> torch.Tensor:
        """Camera frames (uint8 [B, H, W, 3] or [B, cameras, H, W, 3]) -> the model's input images,
        uint8 [B, cameras, S, S, 3] at the model's resolution (resized if needed)."""
        return resize_frames(images, self.config.num_cameras, self.config.image_size)

    def image_patches(self, policy_images: torch.Tensor) -> torch.Tensor:
        """Flattened pixel patches [B, cameras * patches, 3 * p * p] (float32) in visual-token order."""
        return pixel_cells(policy_images, self.config.patch_size)

    def encode_images(self, policy_images: torch.Tensor) -> torch.Tensor:
        """Visual token embeddings [B, cameras * patches, hidden]."""
        batch, cams = policy_images.shape[:2]
        dtype = self.projector[0].weight.dtype
        pixels = policy_images.permute(0, 1, 4, 2, 3).reshape(batch * cams, 3, *policy_images.shape[2:4])
        pixels = (pixels.to(self.projector[0].weight.device, dtype) / 127.5) - 1.0
        features = self.projector(self.vision(pixels))
        return features.reshape(batch, cams * features.shape[1], -1)

    def prompt_embeddings(self, visual: torch.Tensor, text_ids: torch.Tensor,
                          proprio: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS, visual tokens, (proprio), text, (action placeholders)] embeddings, matching self.layout."""
        embed = self.language_model.get_input_embeddings()
        batch = visual.shape[0]
        if (proprio is None) != (self.proprio_projector is None):
            raise ValueError(f"model takes proprio of dimension {self.config.proprio_dim}; "
                             f"got {'none' if proprio is None else tuple(proprio.shape)}")
        if proprio is not None and proprio.shape != (batch, self.config.proprio_dim):
            raise ValueError(f"proprio must be [batch={batch}, {self.config.proprio_dim}], got {tuple(proprio.shape)}")
        if text_ids.dim() != 2 or text_ids.shape != (batch, self.config.num_text_tokens):
            raise ValueError(
                f"text_ids must be [batch={batch}, {self.config.num_text_tokens}], got {tuple(text_ids.shape)}"
            )
        text_ids = text_ids.to(visual.device)
        parts = [embed(torch.full((batch, 1), BOS_TOKEN_ID, device=visual.device)), visual]
        if proprio is not None:
            parts.append(self.proprio_projector(proprio.to(visual.device, visual.dtype))[:, None])
        parts.append(embed(text_ids))
        if self.config.parallel_actions:
            placeholder = torch.full((batch, self.config.num_action_tokens), self.config.vocab_size - 1,
                                     device=visual.device)
            parts.append(embed(placeholder))
        return torch.cat(parts, dim=1)

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action token ids -> continuous actions in [-1, 1] (bin centres; OpenVLA's convention)."""
        bins = (self.config.vocab_size - 1 - tokens).clamp(0, ACTION_BINS - 1).float()
        return (bins + 0.5) / ACTION_BINS * 2.0 - 1.0

    def actions_to_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Continuous actions (clipped to [-1, 1]) -> action token ids: the last 256 of the vocabulary."""
        bins = ((actions.clamp(-1, 1) + 1.0) / 2.0 * ACTION_BINS).floor().clamp(0, ACTION_BINS - 1).long()
        return self.config.vocab_size - 1 - bins

    # -------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory) -> None:
        """model.safetensors + config.json in `directory`."""
        import json
        from pathlib import Path

        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory) -> "VLAModel":
        import json
        from pathlib import Path

        from safetensors.torch import load_model

        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).exists():
                raise FileNotFoundError(f"checkpoint {directory} has no {name}")
        model = cls(VLAConfig(**json.loads((directory / "config.json").read_text())))
        load_model(model, str(directory / "model.safetensors"))
        return model.eval()
