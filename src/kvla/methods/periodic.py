"""`periodic`: reuse every visual token's K/V and refresh the whole prefix every N-th call.

The only temporal reuse that deployment engines ship (FlashRT's `cache_frames=N`): the first call
of an episode and every N-th call after it compute everything; the calls between reuse the
visual K/V of the last refresh in every layer, whatever the camera shows. Text, proprio and
action tokens are recomputed at every call, as for every method. N = 1 is `full`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvla.methods.base import PlanContext, ReuseMethod, register
from kvla.engine.plan import ReusePlan


@register
@dataclass
class PeriodicRefresh(ReuseMethod):
    name = "periodic"
    every: int = 2  # N: calls per refresh of the whole prefix (1: never reuse)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"periodic needs every >= 1, got {self.every}")

    def plan(self, ctx: PlanContext) -> ReusePlan:
        state = ctx.state
        if not state.has_cache or state.step % self.every == 0:
            return ctx.full_plan()
        # a token without complete cached K/V (none after a full refresh) is computed, never guessed
        reusable = ctx.reusable_candidates(0)
        depth = torch.where(reusable, 0, ctx.num_layers).long()
        return ReusePlan(visual_depth=depth, notes={"reused": reusable.sum(1).float().mean().item()})
