"""The partial prefill: recompute only the planned tokens, at their original positions.

kvla runs its own loop over the model's own decoder-layer modules (no fork, no patching). Each
layer receives only the rows it must recompute, with their original position ids (RoPE) and an
explicit additive mask that is causal by original position; the layer's attention writes the fresh
K/V into a position-ordered buffer (`PositionalKVLayer`) and attends over the whole buffer, whose
other slots hold the K/V cached at earlier steps.

Rows are sorted by recompute depth (deepest first), so the rows a layer recomputes are always a
prefix of the rows the layer below recomputed: dropping reused tokens is a slice, not a gather.
Samples of a batch recompute different sets; each layer is padded to the largest set and the
padding rows write into a discard slot that every query masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvla.engine import compat
from kvla.engine.cache import PositionalKVLayer
from kvla.engine.layout import LayoutError, TokenLayout
from kvla.engine.plan import PlanError, ReusePlan
from kvla.engine.state import EpisodeState


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, outputs, vocab] at layout.output_positions
    relevance: torch.Tensor | None  # [B, V] mean text->visual attention over the requested layers
    layer_entropy: torch.Tensor | None  # [B, L]
    computed_tokens: list[int]  # per layer, rows actually computed (padding included)
    statistic_rows: list[int]  # per layer, query rows recomputed for attention statistics (padding included)
    pruned: torch.Tensor | None  # [B, V] bool, visual tokens dropped by a pruning plan
    visual_depth: torch.Tensor  # [B, V] layers each visual token was actually computed in
    # per layer, (row, key) pairs the mask let through, summed over the batch (padding rows included,
    # as in computed_tokens): what a mask-aware attention kernel would compute; a dense one computes
    # rows x all key slots whatever the mask mode
    visible_keys: torch.Tensor | None = None

    def reuse_ratio(self, num_layers: int, rows: slice = slice(None)) -> float:
        """Fraction of visual (token, layer) computations skipped (reused, or pruned), over the
        batch or the samples `rows`."""
        depth = self.visual_depth[rows]
        return 1.0 - depth.float().sum().item() / max(depth.numel() * num_layers, 1)


def _gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b, i], ...] for a [B, rows, ...] tensor and a [B, n] row index."""
    return tensor.gather(1, index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:]))


def _record_source(source: torch.Tensor | None, current: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
    """Per visual token, what its cached K/V was computed from: `current` where recomputed in every layer."""
    current = current.float()
    if source is None:
        return current.clone()
    return torch.where(recomputed[..., None].to(current.device), current, source)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


class PartialPrefillEngine:
    """Drives a Hugging Face causal LM of a family in compat.FAMILIES with per-layer reuse plans."""

    def __init__(self, causal_lm: torch.nn.Module):
        self.causal_lm = causal_lm
        self.parts = compat.decoder_parts(causal_lm)
        self.num_layers = len(self.parts.layers)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.parts.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.parts.lm_head.weight.device

    def num_slots(self, layout: TokenLayout) -> int:
        # prompt slots, one discard slot, then the autoregressively decoded action tokens
        return layout.seq_len + 1 + (0 if layout.parallel else layout.num_action_tokens)

    def _new_cache(self, batch_size: int, layout: TokenLayout):
        p = self.parts
        layers = [
            PositionalKVLayer(batch_size, p.num_kv_heads, self.num_slots(layout), p.head_dim, self.dtype, self.device)
            for _ in range(self.num_layers)
        ]
        return compat.make_cache(layers)

    def _check_state(self, state: EpisodeState, plan: ReusePlan, layout: TokenLayout, batch_size: int,
                     embeds: torch.Tensor) -> None:
        if embeds.dtype != self.dtype or embeds.device != self.device:
            raise TypeError(
                f"input embeddings are {embeds.dtype} on {embeds.device} but the model is "
                f"{self.dtype} on {self.device}"
            )
        reuses = bool((plan.visual_depth < self.num_layers).any())
        if not state.has_cache:
            if reuses:
                raise PlanError(
                    "the plan reuses cached tokens but the episode has no cache: after reset() the "
                    "first step must be a full frame (no reuse)"
                )
            return
        if state.batch_size != batch_size or state.layout != layout:
            raise PlanError(
                f"episode cache was built for batch {state.batch_size} and a different layout; "
                f"got batch {batch_size}: call reset() when the batch or prompt layout changes"
            )
        if state.dtype != self.dtype or state.device != self.device:
            raise TypeError(
                f"episode cache holds {state.dtype} on {state.device} but the model is {self.dtype} "
                f"on {self.device}: call reset() after moving or casting the model"
            )
        if reuses:
            reused = plan.visual_depth.to(state.kv_complete.device) < self.num_layers
            if (reused & ~state.kv_complete).any():
                raise PlanError("the plan reuses visual tokens whose cached K/V is incomplete (pruned earlier)")

    def _prompt_mask(self, row_positions: torch.Tensor, num_slots: int, layout: TokenLayout,
                     window: int | None = None) -> torch.Tensor:
        """Additive mask [B, 1, rows, slots] of prompt rows: a row sees the prompt slots at or before
        its position (with a sliding window, fewer than `window` positions before it) and every slot
        of its own block (the layout's mask mode; a window does not cut a block, as in transformers)."""
        slots = torch.arange(num_slots, device=row_positions.device)
        prompt_len = layout.seq_len
        causal = slots[None, None, :] <= row_positions[:, :, None]
        if window is not None:
            causal &= slots[None, None, :] > row_positions[:, :, None] - window
        if layout.blocks is not None:
            blocks = layout.block_ids(row_positions.device)
            slot_block = torch.cat([blocks, torch.full((num_slots - prompt_len,), -1, device=blocks.device)])
            causal |= slot_block[None, None, :] == blocks[row_positions][:, :, None]
        allowed = causal & (slots < prompt_len)[None, None, :]
        return self._additive(allowed)[:, None]

    def _layer_masks(self, row_positions: torch.Tensor, num_slots: int, layout: TokenLayout) -> dict:
        """{window: mask} for every distinct window of the layers (None: full attention)."""
        return {window: self._prompt_mask(row_positions, num_slots, layout, window) for window in self.parts.windows}

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask

    def _attention_probs(self, layer, layer_input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Softmax attention [B, H, len(index), slots] of the rows `index` ([B, n] into the layer's
        rows), recomputed from the layer input.

        The same projections, norms, rotary function and soft-cap the layer itself applies; only these rows.
        """
        rows_in, cos, sin = (_gather_rows(t, index) for t in (layer_input, cos, sin))
        mask = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
        attn = layer.self_attn
        query = compat.query_states(self.parts, attn, layer.input_layernorm(rows_in))
        query, _ = self.parts.apply_rotary(query, query, cos, sin)
        keys = _repeat_kv(keys, self.parts.num_heads // self.parts.num_kv_heads)
        scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * attn.scaling
        return torch.softmax(compat.attention_logits(self.parts, scores) + mask.float(), dim=-1)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, layout: TokenLayout, plan: ReusePlan, state: EpisodeState,
                visual_patches: torch.Tensor | None = None) -> PrefillResult:
        """Run the prompt through the decoder, recomputing what `plan` says; update `state`.

        visual_patches ([B, V, patch_dim]), when given, is recorded as the source frame of every
        visual token recomputed in all layers, for static detection at later steps.
        """
        if embeds.dim() != 3:
            raise LayoutError(f"embeddings must be [batch, seq, hidden], got shape {tuple(embeds.shape)}")
        batch, seq_len, _ = embeds.shape
        layout.check_sequence(seq_len)
        num_layers = self.num_layers
        plan.validate(layout, num_layers, batch)
        self._check_state(state, plan, layout, batch, embeds)
        if not state.has_cache:
            state.cache = self._new_cache(batch, layout)
            state.layout, state.batch_size = layout, batch
            state.dtype, state.device = self.dtype, self.device
            state.kv_complete = torch.zeros(batch, layout.num_visual, dtype=torch.bool, device=self.device)
            state.source_step = torch.zeros(batch, layout.num_visual, dtype=torch.long, device=self.device)
        cache = state.cache
        device = self.device
        discard_slot = seq_len
        num_slots = self.num_slots(layout)
        visual_positions = layout.visual_positions.to(device)

        depth = torch.full((batch, seq_len), num_layers, dtype=torch.long, device=device)
        depth[:, visual_positions] = plan.visual_depth.to(device)
        order = torch.argsort(-depth, dim=1, stable=True)  # deepest first, then by position
        sorted_depth = depth.gather(1, order)
        computed_per_layer = (sorted_depth[:, :, None] > torch.arange(num_layers, device=device)).sum(1)  # [B, L]
        rows_per_layer = computed_per_layer.max(0).values.tolist()

        rows = order[:, : rows_per_layer[0]]
        hidden = embeds.gather(1, rows[:, :, None].expand(-1, -1, embeds.shape[-1]))
        compat.check_rope_layout(self.parts, layout)
        rope_ids = layout.rope_position_ids(rows)
        rope = compat.rotary_embeddings(self.parts, hidden, rope_ids)  # {rope key: (cos, sin)}
        masks = self._layer_masks(rows, num_slots, layout)  # {window: mask}
        row_depth = sorted_depth[:, : rows_per_layer[0]]

        want_entropy = plan.collect_entropy
        relevance_layers = set(plan.relevance_layers)
        text_positions = torch.arange(*layout.text_span, device=device)
        last_position = torch.tensor([seq_len - 1], device=device)
        prune_layer = plan.prune_after_layer if plan.prune_ratio > 0 else None
        # rows computed in every layer: a prefix of the sorted rows (per sample, those of depth L)
        entropy_rows = rows_per_layer[-1]
        relevance_sum, entropy = None, None
        if want_entropy:
            entropy = torch.zeros(batch, num_layers, device=device)
        statistic_rows = [0] * num_layers
        visible_keys = torch.zeros(num_layers, dtype=torch.long, device=device)
        pruned = None
        key_block = None  # additive [B, 1, 1, slots] applied from the layer after pruning on

        for index, layer in enumerate(self.parts.layers):
            count = rows_per_layer[index]
            if count < hidden.shape[1]:
                hidden, rows, row_depth = hidden[:, :count], rows[:, :count], row_depth[:, :count]
                rope = {key: (cos[:, :count], sin[:, :count]) for key, (cos, sin) in rope.items()}
                masks = {window: mask[:, :, :count] for window, mask in masks.items()}
            cos, sin = rope[self.parts.layer_rope_keys[index]]
            mask = masks[self.parts.layer_windows[index]]
            layer_mask = mask if key_block is None else mask + key_block
            visible_keys[index] = (layer_mask == 0).sum()
            cache.layers[index].write_slots = torch.where(row_depth > index, rows, discard_slot)
            layer_input = hidden
            layer_positions = rows + layout.position_offset if layout.rope_positions is None else rows
            hidden = compat.call_decoder_layer(layer, hidden, layer_mask, layer_positions, cache, (cos, sin))

            # the query rows the statistics of this layer need, and only those
            if want_entropy:
                stat_index = torch.arange(entropy_rows, device=device).expand(batch, -1)
            else:
                wanted = ([text_positions] if index in relevance_layers else []) + \
                         ([last_position] if index == prune_layer else [])
                if not wanted:
                    continue
                stat_index = self._rows_of(rows, torch.cat(wanted).unique())
            statistic_rows[index] = stat_index.shape[1]
            stat_positions = rows.gather(1, stat_index)
            probs = self._attention_probs(layer, layer_input, cos, sin, cache.layers[index].keys, layer_mask,
                                          stat_index)
            if want_entropy:
                valid = (row_depth.gather(1, stat_index) >= num_layers).float()  # other samples' rows, padding
                row_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(1)  # [B, rows]
                entropy[:, index] = (row_entropy * valid).sum(1) / valid.sum(1)
            if index in relevance_layers:
                row_of_text = self._rows_of(stat_positions, text_positions)
                text_probs = probs.gather(2, row_of_text[:, None, :, None].expand(-1, probs.shape[1], -1, probs.shape[-1]))
                score = text_probs[..., visual_positions].mean(dim=(1, 2))
                relevance_sum = score if relevance_sum is None else relevance_sum + score
            if index == prune_layer:
                # pruning: rank by the attention the last prompt position pays each visual token, mean over heads
                last_row = self._rows_of(stat_positions, last_position)[:, 0]
                last_probs = probs.gather(2, last_row[:, None, None, None].expand(-1, probs.shape[1], 1, probs.shape[-1]))
                received = last_probs[:, :, 0, visual_positions].mean(1)  # [B, V]
                num_drop = int(plan.prune_ratio * layout.num_visual)
                dropped = torch.zeros_like(received, dtype=torch.bool)
                dropped.scatter_(1, received.topk(num_drop, dim=1, largest=False).indices, True)
                pruned = dropped
                # a dropped token is computed no deeper than this layer; one reused earlier stays reused
                new_depth = depth.clone()
                new_depth[:, visual_positions] = torch.where(
                    dropped, depth[:, visual_positions].clamp(max=index + 1), depth[:, visual_positions])
                hidden, rows, rope, masks, row_depth, rows_per_layer = self._resort_after_prune(
                    new_depth, hidden, rows, rope, masks, num_layers, rows_per_layer, index)
                key_block = torch.zeros(batch, 1, 1, num_slots, dtype=self.dtype, device=device)
                key_block[:, 0, 0, visual_positions] = torch.where(
                    dropped, torch.finfo(self.dtype).min, 0.0).to(self.dtype)

        out_rows = self._rows_of(rows, layout.output_positions.to(device))
        last_hidden = hidden.gather(1, out_rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = compat.output_logits(self.parts, last_hidden).float()

        # bookkeeping for the next step; a pruned token counts as reused from the layer after pruning
        visual_depth = plan.visual_depth.to(device)
        if pruned is not None:
            visual_depth = torch.where(pruned, visual_depth.clamp(max=plan.prune_after_layer + 1), visual_depth)
        recomputed = visual_depth >= num_layers
        state.source_step = torch.where(recomputed, state.step, state.source_step)
        state.kv_complete = recomputed | (state.kv_complete & (visual_depth < num_layers))
        if visual_patches is not None:
            state.source_patches = _record_source(state.source_patches, visual_patches, recomputed)
        state.source_embeddings = _record_source(state.source_embeddings, embeds[:, visual_positions], recomputed)
        state.pruned_keys = key_block
        state.prune_after_layer = plan.prune_after_layer if pruned is not None else None
        state.step += 1
        relevance = relevance_sum / len(relevance_layers) if relevance_sum is not None else None
        if relevance is not None:
            state.relevance = relevance
        if entropy is not None:
            state.layer_entropy = entropy
        return PrefillResult(logits=logits, relevance=relevance, layer_entropy=entropy,
                             computed_tokens=rows_per_layer, statistic_rows=statistic_rows, pruned=pruned,
                             visible_keys=visible_keys,
                             visual_depth=visual_depth)

    @staticmethod
    def _rows_of(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row index of each wanted position in `rows` ([B, rows] positions) -> [B, len(positions)]."""
        match = rows[:, :, None] == positions[None, None, :]
        if not match.any(1).all():
            raise PlanError("a position that must be computed (text or output) was planned for reuse")
        return match.float().argmax(1)

    def _resort_after_prune(self, new_depth, hidden, rows, rope, masks, num_layers, rows_per_layer, index):
        """Reorder the current rows so that the tokens still computed form a prefix again."""
        row_depth = new_depth.gather(1, rows)
        local = torch.argsort(-row_depth, dim=1, stable=True)
        hidden, rows, row_depth = (_gather_rows(t, local) for t in (hidden, rows, row_depth))
        rope = {key: (_gather_rows(cos, local), _gather_rows(sin, local)) for key, (cos, sin) in rope.items()}
        masks = {window: mask.gather(2, local[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
                 for window, mask in masks.items()}
        counts = (row_depth[:, :, None] > torch.arange(num_layers, device=rows.device)).sum(1).max(0).values.tolist()
        rows_per_layer = rows_per_layer[: index + 1] + counts[index + 1:]
        return hidden, rows, rope, masks, row_depth, rows_per_layer

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_greedy(self, first_logits: torch.Tensor, layout: TokenLayout, state: EpisodeState) -> torch.Tensor:
        """Autoregressive greedy decoding of layout.num_action_tokens tokens (OpenVLA style).

        first_logits: [B, vocab] at the last prompt position. Returns token ids [B, num_action_tokens].
        """
        if layout.parallel:
            raise LayoutError("layout decodes its actions in parallel; there is nothing to generate")
        cache = state.cache
        batch, seq_len = first_logits.shape[0], layout.seq_len
        num_slots = self.num_slots(layout)
        device = self.device
        tokens = [first_logits.argmax(-1)]
        slots = torch.arange(num_slots, device=device)
        # the sequence index each slot holds: the prompt, then (after the discard slot) the decoded tokens
        slot_index = torch.where(slots < seq_len, slots, slots - 1)
        for step in range(1, layout.num_action_tokens):
            position = seq_len + step - 1
            slot = seq_len + step  # after the discard slot
            hidden = self.parts.embed_tokens(tokens[-1])[:, None, :]
            position_ids = torch.full((batch, 1), position + layout.position_offset, dtype=torch.long, device=device)
            rope_ids = layout.decode_rope_position_ids(step - 1, batch, device)
            allowed = (slots < seq_len) | ((slots > seq_len) & (slots <= slot))
            masks = {window: self._additive(allowed if window is None else allowed & (slot_index > position - window))
                     .expand(batch, 1, 1, num_slots) for window in self.parts.windows}
            rope = compat.rotary_embeddings(self.parts, hidden, rope_ids)
            write = torch.full((batch, 1), slot, dtype=torch.long, device=device)
            for index, layer in enumerate(self.parts.layers):
                layer_mask = masks[self.parts.layer_windows[index]]
                if state.pruned_keys is not None and index > state.prune_after_layer:
                    layer_mask = layer_mask + state.pruned_keys
                cache.layers[index].write_slots = write
                hidden = compat.call_decoder_layer(layer, hidden, layer_mask, position_ids, cache,
                                                   rope[self.parts.layer_rope_keys[index]])
            logits = compat.output_logits(self.parts, hidden)[:, -1].float()
            tokens.append(logits.argmax(-1))
        return torch.stack(tokens, dim=1)
