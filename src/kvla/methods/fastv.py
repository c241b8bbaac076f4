"""`fastv`: FastV (Chen et al., arXiv 2403.06764), the within-frame pruning baseline.

After decoder layer K, the visual tokens that receive the least attention (averaged over heads
and query rows at layer K) are dropped for the rest of the forward: not computed, and masked out
of attention in deeper layers. Nothing is reused across frames. Paper defaults K=2, R=50 %.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvla.methods.base import PlanContext, ReuseMethod, register
from kvla.engine.plan import ReusePlan


@register
@dataclass
class FastV(ReuseMethod):
    name = "fastv"
    layer: int = 2  # K: prune after this layer (0-based index of the layer whose attention ranks tokens)
    ratio: float = 0.5  # R: fraction of visual tokens dropped

    def plan(self, ctx: PlanContext) -> ReusePlan:
        layer = min(self.layer, ctx.num_layers - 2)
        return ctx.full_plan(prune_after_layer=layer, prune_ratio=self.ratio)
