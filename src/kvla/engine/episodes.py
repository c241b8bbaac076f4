"""Several episodes through one prefill: each robot keeps its own EpisodeState (batch 1), and a
control step that serves many robots gathers their states into one batch and scatters the
result back, so each sample runs with its own cache and reuse plan and nothing of one episode
reaches another.

The engine keeps one step counter per state; token ages are per sample, so the gathered state
runs at step 0 with each sample's source steps made relative to its own step, and scattering
adds the step back.
"""

from __future__ import annotations

import torch

from kvla.engine import compat
from kvla.engine.cache import PositionalKVLayer
from kvla.engine.layout import TokenLayout
from kvla.engine.state import EpisodeState


def _rows(states: list[EpisodeState], name: str, blank) -> torch.Tensor | None:
    """Concatenate one [1, ...] field over the states; `blank(template)` fills states without it."""
    values = [getattr(s, name) for s in states]
    template = next((v for v in values if v is not None), None)
    if template is None:
        return None
    return torch.cat([v if v is not None else blank(template) for v in values])


def gather_episodes(states: list[EpisodeState], layout: TokenLayout, dtype: torch.dtype,
                    device: torch.device) -> EpisodeState:
    """One batched state from single-sample episode states; a state that has not run a step yet
    contributes blank rows (its plan must then compute every token, as after any reset)."""
    for index, state in enumerate(states):
        if state.has_cache and (state.batch_size != 1 or state.layout != layout or state.dtype != dtype
                                or state.device != device):
            raise ValueError(f"episode {index} holds a cache of batch {state.batch_size} or another layout, dtype "
                             "or device; batched episodes are single-sample states of one model")
    started = [s for s in states if s.has_cache]
    merged = EpisodeState()
    merged.layout, merged.batch_size, merged.dtype, merged.device = layout, len(states), dtype, device
    if not started:
        return merged
    if any(s.source_patches is None for s in started) and any(s.source_patches is not None for s in started):
        raise ValueError("some episodes recorded their source patches and some did not; step them alike")
    layers = []
    for index, layer in enumerate(started[0].cache.layers):
        blank_keys, blank_values = torch.zeros_like(layer.keys), torch.zeros_like(layer.values)
        layers.append(PositionalKVLayer.from_tensors(
            torch.cat([s.cache.layers[index].keys if s.has_cache else blank_keys for s in states]),
            torch.cat([s.cache.layers[index].values if s.has_cache else blank_values for s in states])))
    merged.cache = compat.make_cache(layers)
    merged.step = 0
    merged.source_step = torch.cat([s.source_step - s.step if s.has_cache else
                                    torch.zeros_like(started[0].source_step) for s in states])
    merged.kv_complete = torch.cat([s.kv_complete if s.has_cache else torch.zeros_like(started[0].kv_complete)
                                    for s in states])
    merged.source_patches = _rows(states, "source_patches", torch.zeros_like)
    merged.source_embeddings = _rows(states, "source_embeddings", torch.zeros_like)
    merged.relevance = _rows(states, "relevance", torch.zeros_like)
    merged.layer_entropy = _rows(states, "layer_entropy", torch.zeros_like)
    return merged


def scatter_episodes(merged: EpisodeState, states: list[EpisodeState], *, collected_relevance: bool,
                     collected_entropy: bool) -> None:
    """Write a batched state's rows back into the single-sample states it was gathered from
    (copies, so that no episode keeps the batch's tensors alive), and count the step."""
    for row, state in enumerate(states):
        layers = [PositionalKVLayer.from_tensors(layer.keys[row:row + 1].clone(), layer.values[row:row + 1].clone())
                  for layer in merged.cache.layers]
        step = state.step if state.has_cache else 0
        state.cache = compat.make_cache(layers)
        state.layout, state.batch_size, state.dtype, state.device = merged.layout, 1, merged.dtype, merged.device
        state.source_step = merged.source_step[row:row + 1] + step
        state.kv_complete = merged.kv_complete[row:row + 1].clone()
        for name in ("source_patches", "source_embeddings"):
            value = getattr(merged, name)
            setattr(state, name, None if value is None else value[row:row + 1].clone())
        if collected_relevance:
            state.relevance = merged.relevance[row:row + 1].clone()
        if collected_entropy:
            state.layer_entropy = merged.layer_entropy[row:row + 1].clone()
        state.pruned_keys = None if merged.pruned_keys is None else merged.pruned_keys[row:row + 1].clone()
        state.prune_after_layer = merged.prune_after_layer
        state.step = step + 1
