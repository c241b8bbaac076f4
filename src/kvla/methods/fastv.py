"""`fastv`: FastV (Chen et al., arXiv 2403.06764), the within-frame pruning baseline.

After decoder layer K, the R visual tokens that receive the least attention are dropped for the
rest of the forward: not computed, and masked out of attention in deeper layers. Nothing is
reused across frames. Paper defaults K=2, R=50 %.

The rank is the attention the LAST prompt position pays each visual token at layer K, mean over
heads, as in FastV's official code. Not a mean over all query rows: under the causal mask a token
is seen only by the rows after it, so such a mean ranks later tokens lower whatever they show.
With parallel action placeholders (OFT-style layouts) the last prompt position is the last
placeholder, the row whose output is decoded last; with autoregressive decoding it is the last
text token, the row that predicts the first action token.
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
