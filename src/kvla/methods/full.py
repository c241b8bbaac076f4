"""`full`: no reuse. The baseline every method is compared against (sdpa attention, no maps)."""

from __future__ import annotations

from dataclasses import dataclass

from kvla.methods.base import PlanContext, ReuseMethod, register
from kvla.engine.plan import ReusePlan


@register
@dataclass
class Full(ReuseMethod):
    name = "full"

    def plan(self, ctx: PlanContext) -> ReusePlan:
        return ctx.full_plan()
