"""What one control step recomputes, and what it collects on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvla.engine.layout import TokenLayout


class PlanError(ValueError):
    """A reuse plan that cannot be carried out on this model, layout or episode state."""


@dataclass
class ReusePlan:
    """Per-sample, per-visual-token recompute depth for one prefill.

    visual_depth[b, i] = d means visual token i of sample b is recomputed in decoder layers
    0..d-1 and its K/V is read from the cache in layers d..L-1 (the layer-adaptive schedule:
    once reused, a token is never recomputed deeper). d = L recomputes it everywhere (no reuse),
    d = 0 reuses it in every layer. Every non-visual token is recomputed in every layer.

    prune_after_layer / prune_ratio implement FastV-style dropping on top of the depths: at that
    layer the visual tokens are ranked by the attention the last prompt position
    (layout.seq_len - 1) pays them, mean over heads, and the given fraction of least-attended
    ones leaves the computation and is masked out of attention in deeper layers. A dropped token
    counts as reused from the layer after pruning on (its deeper slots keep their cached K/V),
    so a pruning plan that also reuses is checked against the episode cache like any other.

    Statistics are recomputed from each layer's input for the query rows they need only:
    relevance for the text rows, the pruning rank for the last prompt row. Entropy is taken
    over one row set shared by every layer: the rows computed in EVERY layer of this step (all
    rows on a full plan; on a partial plan the non-visual rows and the visual tokens with depth
    L), so that per-layer values are comparable; the rows of a pruning plan are not known before
    the prefill, so a plan cannot collect entropy and prune.
    """

    visual_depth: torch.Tensor  # [batch, num_visual] long
    relevance_layers: tuple[int, ...] = ()  # collect text->visual attention in these layers
    collect_entropy: bool = False  # collect per-layer attention entropy over the rows computed in every layer
    prune_after_layer: int | None = None
    prune_ratio: float = 0.0
    notes: dict = field(default_factory=dict)  # method-specific diagnostics (sizes of sets)

    @classmethod
    def full(cls, batch_size: int, layout: TokenLayout, num_layers: int, **kwargs) -> "ReusePlan":
        depth = torch.full((batch_size, layout.num_visual), num_layers, dtype=torch.long)
        return cls(visual_depth=depth, **kwargs)

    def reuse_ratio(self, num_layers: int) -> float:
        """Planned fraction of visual (token, layer) computations taken from the cache.

        FastV drops are decided during the prefill; PrefillResult.reuse_ratio counts them too."""
        reused = (num_layers - self.visual_depth.clamp(max=num_layers)).sum().item()
        return reused / (self.visual_depth.numel() * num_layers) if self.visual_depth.numel() else 0.0

    def validate(self, layout: TokenLayout, num_layers: int, batch_size: int) -> None:
        depth = self.visual_depth
        if depth.dim() != 2 or depth.shape != (batch_size, layout.num_visual):
            raise PlanError(
                f"visual_depth has shape {tuple(depth.shape)}, expected (batch={batch_size}, "
                f"visual tokens={layout.num_visual})"
            )
        if depth.dtype not in (torch.int64, torch.int32):
            raise PlanError(f"visual_depth must be an integer tensor, got {depth.dtype}")
        if depth.numel() and (depth.min() < 0 or depth.max() > num_layers):
            raise PlanError(
                f"visual_depth values must lie in [0, {num_layers}] (layers of the model), "
                f"got [{int(depth.min())}, {int(depth.max())}]"
            )
        for layer in self.relevance_layers:
            if not 0 <= layer < num_layers:
                raise PlanError(f"relevance layer {layer} is outside the model's {num_layers} layers")
        if self.prune_after_layer is not None:
            if not 0 <= self.prune_after_layer < num_layers - 1:
                raise PlanError(
                    f"prune_after_layer {self.prune_after_layer} must lie in [0, {num_layers - 2}]"
                )
            if not 0.0 <= self.prune_ratio < 1.0:
                raise PlanError(f"prune_ratio must lie in [0, 1), got {self.prune_ratio}")
            if self.collect_entropy and self.prune_ratio > 0:
                raise PlanError("a pruning plan cannot collect entropy: the rows computed in every layer, "
                                "over which entropy is taken, are only known once the prefill has pruned")
