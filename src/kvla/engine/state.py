"""Everything that lives across the control steps of one episode, in one object."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from kvla.engine.layout import TokenLayout


class EpisodeState:
    """Per-episode KV buffers and the bookkeeping reuse decisions need. Call reset() per episode.

    Per visual token it remembers the step at which its oldest cached K/V was computed
    (`source_step`), the image patch it was computed from (`source_patches`) and its decoder
    input embedding then (`source_embeddings`): static detection compares the current frame with
    that source frame, not merely with the previous frame, so a slow drift cannot accumulate
    unseen. Because a token is reused in a suffix of layers, its deepest layer always holds its
    oldest K/V, so one step per token suffices.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cache: Cache | None = None
        self.layout: TokenLayout | None = None
        self.batch_size = 0
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.step = 0  # steps completed in this episode
        self.source_step: torch.Tensor | None = None  # [B, V] long
        self.source_patches: torch.Tensor | None = None  # [B, V, patch_dim] float32
        self.source_embeddings: torch.Tensor | None = None  # [B, V, hidden] float32 decoder inputs
        self.kv_complete: torch.Tensor | None = None  # [B, V] bool: cached K/V valid in every layer
        self.relevance: torch.Tensor | None = None  # [B, V] text->visual attention of the last step
        self.layer_entropy: torch.Tensor | None = None  # [B, L] attention entropy of the last step that took it
        self.pruned_keys: torch.Tensor | None = None  # additive [B, 1, 1, slots] mask of the last prefill's drops
        self.prune_after_layer: int | None = None
        # what a method keeps between the calls of one episode (its previous frame, its random
        # generator), under the method's name; cleared here so nothing reaches the next episode
        self.method_memory: dict[str, dict] = {}

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    def token_age(self) -> torch.Tensor:
        """Steps since each visual token's oldest cached K/V was computed."""
        if self.source_step is None:
            raise RuntimeError("no step has run in this episode yet")
        return self.step - self.source_step

    def kv_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(layer.nbytes() for layer in self.cache.layers)
