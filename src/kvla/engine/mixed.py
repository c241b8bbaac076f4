"""The differentiable reuse path, for training what decides reuse.

Every prompt row is computed, but in every decoder layer the K/V the layer attends over is, at
each visual position, a mix  w * fresh + (1 - w) * cached  of the K/V computed now and the K/V
cached from an earlier frame at the same position (post-RoPE, as the inference engine caches it).
w is a per-token recompute weight [B, V] that may carry gradients. Non-visual rows always use
their fresh K/V.

- w = 1 everywhere is the model's own forward (the cache is ignored).
- w in {0, 1} is the inference engine's partial prefill with the w = 0 tokens reused in every
  layer: a reused token's own hidden state is still computed here, but nothing reads it, since
  other rows see it only through its (cached) K/V.

The layers are the model's own modules, called with a transformers Cache whose per-layer storage
does the mixing (the same extension point the inference engine uses); nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from kvla.engine import compat
from kvla.engine.layout import LayoutError, TokenLayout


class MixedKVLayer(DynamicLayer):
    """One layer's K/V for a mixed forward: remembers the fresh K/V, returns the mix to attend over."""

    def __init__(self, cached: tuple[torch.Tensor, torch.Tensor] | None, weight: torch.Tensor | None):
        super().__init__()
        self.cached = cached
        self.weight = weight  # [B, 1, S, 1]: 1 at non-visual positions
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.fresh = (key_states, value_states)
        if self.cached is None:
            return key_states, value_states
        cached_keys, cached_values = self.cached
        if cached_keys.shape != key_states.shape:
            raise LayoutError(f"cached K/V has shape {tuple(cached_keys.shape)} but this frame's is "
                              f"{tuple(key_states.shape)}: the cache must come from the same layout and batch")
        weight = self.weight.to(key_states.dtype)
        return (weight * key_states + (1 - weight) * cached_keys,
                weight * value_states + (1 - weight) * cached_values)

    def get_seq_length(self) -> int:
        return 0 if self.fresh is None else self.fresh[0].shape[-2]


@dataclass
class MixedForward:
    logits: torch.Tensor  # [B, outputs, vocab] at layout.output_positions
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, the fresh K/V of this frame (a cache for the next)


def mixed_reuse_forward(engine, embeds: torch.Tensor, layout: TokenLayout,
                        cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        recompute_weight: torch.Tensor | None = None) -> MixedForward:
    """Run the prompt through `engine`'s decoder with K/V mixing at the visual positions.

    engine: a PartialPrefillEngine (its decoder parts). cached: per layer (keys, values)
    [B, kv_heads, S, head_dim] from an earlier frame (MixedForward.kv), or None for a plain
    forward. recompute_weight: [B, V] in [0, 1], needed with `cached`. Gradients flow to the
    embeddings and to the weight; freeze the model's parameters to train only what makes them.
    """
    parts = engine.parts
    if embeds.dim() != 3:
        raise LayoutError(f"embeddings must be [batch, seq, hidden], got shape {tuple(embeds.shape)}")
    batch, seq_len, _ = embeds.shape
    layout.check_sequence(seq_len)
    weight = None
    if cached is not None:
        if recompute_weight is None or recompute_weight.shape != (batch, layout.num_visual):
            raise LayoutError(f"a mixed forward needs recompute_weight of shape (batch={batch}, "
                              f"visual tokens={layout.num_visual})")
        if len(cached) != engine.num_layers:
            raise LayoutError(f"cached K/V has {len(cached)} layers, the model {engine.num_layers}")
        weight = torch.ones(batch, seq_len, dtype=recompute_weight.dtype, device=embeds.device)
        weight = weight.index_copy(1, layout.visual_positions.to(embeds.device), recompute_weight.to(embeds.device))
        weight = weight[:, None, :, None]
    layers = [MixedKVLayer(None if cached is None else cached[i], weight) for i in range(engine.num_layers)]
    cache = compat.make_cache(layers)
    positions = torch.arange(seq_len, device=embeds.device).expand(batch, -1)
    masks = engine._layer_masks(positions, seq_len, layout)
    compat.check_rope_layout(parts, layout)
    rope = compat.rotary_embeddings(parts, embeds, layout.rope_position_ids(positions))
    layer_positions = positions + layout.position_offset if layout.rope_positions is None else positions
    hidden = embeds
    for index, layer in enumerate(parts.layers):
        hidden = compat.call_decoder_layer(layer, hidden, masks[parts.layer_windows[index]], layer_positions, cache,
                                           rope[parts.layer_rope_keys[index]])
    outputs = hidden[:, layout.output_positions.to(embeds.device)]
    logits = compat.output_logits(parts, outputs).float()
    return MixedForward(logits=logits, kv=[layer.fresh for layer in layers])
