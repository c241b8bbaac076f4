"""A KV cache that holds past frames as context: the engine of the history methods.

A history VLA reads one causal sequence per episode: per control step, the frame's tokens (BOS,
visual tokens, proprio), then the step's query (instruction, action placeholders) that only that
step reads. Every frame is computed once, when it arrives; its K/V stays in the cache at its
original position, so keeping every frame is exact for a causal model (the same logits as the
teacher-forced training forward over the whole sequence). A step's query rows are dropped from
the cache right after the step, so no later step sees them.

Between steps a history method may drop cache entries or replace a run of them with fewer
(pooled) entries; every edit keeps the entries in position order, so causality is kept: a query
only ever sees entries of earlier positions and its own block.

The layers are the model's own modules called from kvla's loop with a transformers Cache whose
per-layer storage is `HistoryKVLayer` (the extension point the other engines use); nothing is
patched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvla.engine import compat

FRAME, POOLED = 1, 2  # entry kinds: a frame's own token, a pooled summary of a run of them


class HistoryError(ValueError):
    """A history step or cache edit that cannot be carried out as asked."""


class HistoryKVLayer(DynamicLayer):
    """One decoder layer's K/V [B, kv_heads, entries, head_dim], appended in order and edited between steps."""

    def __init__(self):
        super().__init__()
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.numel() * self.keys.element_size() * 2


class HistoryState:
    """One episode's history cache and what is known of each entry. Call reset() per episode.

    Per cache entry (the same in every layer and every sample of the batch): its kind (FRAME,
    POOLED), the control step of the frame it came from and its position. `method_memory` holds what a history method keeps between the steps of one episode.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.entry_kind: torch.Tensor | None = None  # [N] long
        self.entry_frame: torch.Tensor | None = None  # [N] long
        self.entry_position: torch.Tensor | None = None  # [N] long
        self.text_ids: torch.Tensor | None = None
        self.batch_size = 0
        self.step = 0  # frames seen in this episode
        self.peak_entries = 0  # the most entries the cache held between two steps
        self.method_memory: dict[str, dict] = {}

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    @property
    def num_entries(self) -> int:
        return 0 if self.entry_kind is None else len(self.entry_kind)

    def layers(self) -> list[HistoryKVLayer]:
        if self.cache is None:
            raise HistoryError("the episode has no history yet")
        return list(self.cache.layers)

    def kv_bytes(self) -> int:
        return 0 if self.cache is None else sum(layer.nbytes() for layer in self.cache.layers)

    def frames_held(self) -> list[int]:
        """The control steps whose frames still have entries: a frame at full resolution, and for
        a pooled run the first frame it was pooled from."""
        if self.entry_frame is None:
            return []
        return sorted(set(self.entry_frame.tolist()))

    def append(self, kinds: torch.Tensor, frames: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the metadata of entries the engine has just appended."""
        if self.entry_kind is None:
            self.entry_kind, self.entry_frame, self.entry_position = kinds, frames, positions
        else:
            self.entry_kind = torch.cat([self.entry_kind, kinds])
            self.entry_frame = torch.cat([self.entry_frame, frames])
            self.entry_position = torch.cat([self.entry_position, positions])

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the entries `index` (ascending); drop the rest from every layer."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (index.diff() <= 0).any():
            raise HistoryError("kept entries must be given in ascending order (position order keeps causality)")
        if index.numel() and (index[0] < 0 or index[-1] >= self.num_entries):
            raise HistoryError(f"entry index out of range: the cache holds {self.num_entries} entries")
        for layer in self.layers():
            device_index = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(2, device_index)
            layer.values = layer.values.index_select(2, device_index)
        self.entry_kind, self.entry_frame, self.entry_position = (
            t[index] for t in (self.entry_kind, self.entry_frame, self.entry_position))

    def replace_run(self, start: int, end: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                    frame: int) -> None:
        """Replace entries [start, end) with the given per-layer K/V [B, kv_heads, n, head_dim] (n <= end - start),
        recorded as POOLED entries of `frame`. Their recorded positions (the run's first n) only keep
        the entries' order; RoPE is already inside the cached keys."""
        layers = self.layers()
        if not 0 <= start < end <= self.num_entries:
            raise HistoryError(f"run [{start}, {end}) is outside a cache of {self.num_entries} entries")
        if len(keys) != len(layers) or len(values) != len(layers):
            raise HistoryError(f"replacement K/V for {len(keys)} layers; the model has {len(layers)}")
        count = keys[0].shape[2]
        if not 0 < count <= end - start:
            raise HistoryError(f"a run of {end - start} entries cannot be replaced by {count}")
        for layer, new_keys, new_values in zip(layers, keys, values):
            if new_keys.shape[2] != count or new_values.shape != new_keys.shape:
                raise HistoryError("every layer's replacement must have the same number of entries")
            layer.keys = torch.cat([layer.keys[:, :, :start], new_keys.to(layer.keys.dtype), layer.keys[:, :, end:]], 2)
            layer.values = torch.cat([layer.values[:, :, :start], new_values.to(layer.values.dtype),
                                      layer.values[:, :, end:]], 2)
        kinds = torch.full((count,), POOLED, dtype=torch.long)
        frames = torch.full((count,), frame, dtype=torch.long)
        positions = self.entry_position[start:start + count]
        self.entry_kind = torch.cat([self.entry_kind[:start], kinds, self.entry_kind[end:]])
        self.entry_frame = torch.cat([self.entry_frame[:start], frames, self.entry_frame[end:]])
        self.entry_position = torch.cat([self.entry_position[:start], positions, self.entry_position[end:]])

    def crop(self, entries: int) -> None:
        """Keep the first `entries` entries (drops the query rows a step appended last): a slice,
        no copy of the history."""
        if not 0 <= entries <= self.num_entries:
            raise HistoryError(f"cannot crop a cache of {self.num_entries} entries to {entries}")
        for layer in self.layers():
            layer.keys, layer.values = layer.keys[:, :, :entries], layer.values[:, :, :entries]
        self.entry_kind, self.entry_frame, self.entry_position = (
            t[:entries] for t in (self.entry_kind, self.entry_frame, self.entry_position))


def attention_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype inside autocast (training), else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model_dtype


class HistoryEngine:
    """Runs blocks of a history sequence through the model's own decoder layers."""

    def __init__(self, causal_lm: torch.nn.Module):
        self.causal_lm = causal_lm
        self.parts = compat.decoder_parts(causal_lm)
        self.num_layers = len(self.parts.layers)
        # a history attends across frames by its own masks; a sliding window would cut them silently
        windows = [w for w in self.parts.layer_windows if w is not None]
        self.max_entries = min(windows) if windows else None

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.parts.lm_head.weight.device

    def new_cache(self):
        return compat.make_cache([HistoryKVLayer() for _ in range(self.num_layers)])

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """Final-norm hidden states [B, q, hidden] of `embeds` [B, q, hidden] at `positions` [B, q],
        attending over the cache's entries and then their own rows, as `mask` [B or 1, 1, q,
        entries + q] allows: boolean (True: attend) or additive. The new K/V are appended to `cache`."""
        if mask.dtype == torch.bool:  # additive, as every attention implementation reads it
            dtype = attention_dtype(embeds.device, self.dtype)
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        if self.max_entries is not None and int(positions.max()) >= self.max_entries:
            raise HistoryError(
                f"this {self.parts.model_type} model attends through a sliding window of {self.max_entries} positions, "
                f"and the history reaches position {int(positions.max())}: the window would silently cut the history "
                "(a shorter history, or a model without sliding windows)")
        rope = compat.rotary_embeddings(self.parts, embeds, positions)
        hidden = embeds
        for index, layer in enumerate(self.parts.layers):
            hidden = compat.call_decoder_layer(layer, hidden, mask, positions, cache, rope[self.parts.layer_rope_keys[index]])
        return self.parts.final_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compat.head_logits(self.parts, hidden)

    @torch.no_grad()
    def extend(self, state: HistoryState, embeds: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor,
               frames: torch.Tensor) -> torch.Tensor:
        """Append a block: every cached entry is visible to it, its own rows causally.
        Returns its final-norm hidden states [B, q, hidden]."""
        batch, rows, _ = embeds.shape
        if embeds.dtype != self.dtype or embeds.device != self.device:
            raise TypeError(f"embeddings are {embeds.dtype} on {embeds.device}, the model {self.dtype} on {self.device}")
        if not state.has_cache:
            state.cache, state.batch_size = self.new_cache(), batch
        elif state.batch_size != batch:
            raise HistoryError(f"the episode's history holds batch {state.batch_size}, this step has {batch}: "
                               "call reset() when the batch changes")
        if state.num_entries and positions.min() <= state.entry_position.max():
            raise HistoryError("a new block must come after every cached position")
        past = state.num_entries
        causal = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril()
        mask = torch.cat([torch.ones(rows, past, dtype=torch.bool, device=self.device), causal], dim=1)
        hidden = self.forward(embeds, positions.to(self.device).expand(batch, -1), mask[None, None], state.cache)
        state.append(kinds.cpu(), frames.cpu(), positions.cpu())
        return hidden
