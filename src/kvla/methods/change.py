"""Change detection: is a patch still the one its cached K/V was computed from?

- `cosine` (VLA-Cache, arXiv 2502.02175, Eq. 2): the cosine similarity of the patch's pixels with
  the source patch. It is blind to a change of scale: a patch dimmed to 0.8 keeps cosine 1.0, and a
  10 % colour cast on a grey patch keeps 0.999. Kept so that published numbers can be reproduced.
- `photometric`: the cosine rule, and besides it each colour channel's mean and standard deviation
  over the patch must stay within `levels` grey levels (0..255) of the source's. That catches
  global and local brightness, contrast and colour changes (flicker, exposure, white balance,
  shadows), while sensor noise, which moves a patch mean by a fraction of a level, passes.

Both return a similarity in [0, 1] per token (1: unchanged): `photometric` gives 0 to a patch that
fails the photometric check, and the cosine otherwise, so thresholds (`tau`) and rankings by
similarity mean the same under both.
"""

from __future__ import annotations

import torch

CHANGE_RULES = ("cosine", "photometric")


def patch_similarity(patches: torch.Tensor, source: torch.Tensor, rule: str = "cosine",
                     levels: float = 2.0) -> torch.Tensor:
    """[B, V] similarity of pixel patches [B, V, cell * cell * 3] (RGB fastest, 0..255) with their source."""
    if rule not in CHANGE_RULES:
        raise ValueError(f"unknown change rule {rule!r}; choose from {', '.join(CHANGE_RULES)}")
    source = source.to(patches.device)
    cosine = torch.nn.functional.cosine_similarity(patches, source, dim=-1, eps=1e-8)
    if rule == "cosine":
        return cosine
    return torch.where(photometric_unchanged(patches, source, levels), cosine, torch.zeros_like(cosine))


def photometric_unchanged(patches: torch.Tensor, source: torch.Tensor, levels: float = 2.0) -> torch.Tensor:
    """[B, V] bool: each channel's patch mean and standard deviation within `levels` grey levels of the source's."""
    if patches.shape[-1] % 3:
        raise ValueError(f"patches of {patches.shape[-1]} values are not RGB pixels")
    source = source.to(patches.device)
    # both frames' channel moments at once, [2, B, V, 3]; std from E[x^2] - E[x]^2 in float64 (exact
    # to 1e-13 levels here) is 4x faster than torch.std's reduction over the strided pixel axis
    # (scripts/change_rule_cost.py)
    both = torch.stack([patches, source]).double().unflatten(-1, (-1, 3))  # [2, B, V, pixels, 3]
    mean = both.mean(-2)
    std = ((both * both).mean(-2) - mean * mean).clamp_min(0).sqrt()
    moved = torch.maximum((mean[0] - mean[1]).abs(), (std[0] - std[1]).abs())
    return moved.amax(-1) <= levels
