"""`static`: naive reuse of every static patch in every layer.

The ablation VLA-Cache (arXiv 2502.02175) starts from: a patch is static when the cosine
similarity of its pixels with the frame its cached K/V came from is >= tau (Sec. 3.2, Eq. 2);
no top-k, no task-relevance filter, no layer schedule. By default kvla also asks each patch's
brightness, contrast and colour to be unchanged (`change=photometric`, methods/change.py), which
the cosine test alone does not see; `change=cosine` is the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvla.methods.base import PlanContext, ReuseMethod, register
from kvla.engine.plan import ReusePlan


@register
@dataclass
class StaticReuse(ReuseMethod):
    name = "static"
    tau: float = 0.996  # static-patch cosine threshold
    max_age: int = 0  # recompute a token whose K/V is this many steps old (0: never forced)
    change: str = "photometric"  # change rule (methods/change.py): photometric, or cosine (the paper's)
    levels: float = 2.0  # photometric: largest change of a channel's patch mean or std, in grey levels

    def __post_init__(self):
        from kvla.methods.change import CHANGE_RULES

        if self.change not in CHANGE_RULES:
            raise ValueError(f"change must be one of {', '.join(CHANGE_RULES)}, got {self.change!r}")

    def plan(self, ctx: PlanContext) -> ReusePlan:
        if not ctx.state.has_cache:
            return ctx.full_plan()
        static = (ctx.patch_similarity(self.change, self.levels) >= self.tau) & ctx.reusable_candidates(self.max_age)
        depth = torch.where(static, 0, ctx.num_layers).long()
        return ReusePlan(visual_depth=depth, notes={"static": static.sum(1).float().mean().item()})
