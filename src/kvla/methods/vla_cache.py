"""`vla_cache`: VLA-Cache (Xu et al., arXiv 2502.02175), training-free cross-frame token reuse.

1. Static selection (Sec. 3.2, Eq. 2): cosine similarity of each 14x14 pixel patch of the
   policy's input image with the same patch of the frame its cached K/V was computed from
   (not merely the previous frame); static if Sim >= tau; keep the top-k most similar (per camera).
2. Task-relevance filtering (Sec. 3.3): text->visual attention of the decoder, averaged over heads
   and text rows (and over the chosen layers), taken from the previous step's prefill and
   computed only for those rows and layers. P_reuse = P_static \\ P_task-relevant, where
   task-relevant is either the paper's rule (min-max normalised score > tau_task) or the official
   code's rule (the task_top_k most attended patches).
3. Layer-adaptive reuse (Sec. 3.4): from the per-layer attention entropy E_l (mean over heads
   and over the rows computed in every layer of that step, see ReusePlan),
   - "paper": R_l = (E_{l-1} - E_l) / E_{l-1},  alpha_l = min(k * sum_{j<=l} R_j, 1)  (Eq. 6-7);
   - "code":  r_l = 1 - minmax(E)_l, increases damped by `code_smoothing`, applied only at
     `code_layers` (official: 2, 6, 9, 11 of 32, scaled to the model's depth);
   - "none":  every reusable token is reused in every layer.
   At layer l the first floor(alpha_l * |P_reuse|) reusable tokens (most static first for
   "paper", raster order for "code") are reused from l on; alpha is made non-decreasing because
   a reused token is never recomputed deeper. "paper" takes E once, from the first (full) frame
   of the episode; "code" takes it at every step from the previous step's prefill, as the
   official code does.
Defaults follow the paper (tau 0.996, top-k 100, tau_task 0.5, relevance from the middle layer),
except the change rule: `change=photometric` by default, which adds to the paper's cosine test a
check of each patch's brightness, contrast and colour (methods/change.py); `change=cosine`
reproduces the paper (BENCHMARKS.md, "Photometric change detection", says why).

kvla's own options, off by default: `max_age` forces a recompute of K/V computed that many steps
ago; `similarity=embeddings` compares each visual token's decoder input (the vision encoder and
projector output) instead of its pixels, so a patch whose pixels did not change but whose
embedding did (the encoder's attention mixes the whole image) is not taken as static.

The official code's OpenVLA settings are OFFICIAL_CODE_SPEC: top-k 130 (150 per camera for
OFT), the 100 most attended patches removed, relevance from layer 15 of 32 (relevance_depth
15/32: layer round(15 L / 32) of an L-layer model), the "code" schedule. Where kvla still
differs from the official code with those settings:
- entropy: the official code averages each layer's entropy over the rows that layer computed,
  which differ from layer to layer once tokens are dropped; kvla averages every layer over the
  same rows, those computed in every layer of the step;
- static detection: the official code compares with the previous frame only; kvla compares with
  the frame each token's cached K/V was computed from (and can force a recompute by `max_age`),
  so a slow drift is not reused indefinitely;
- an empty reusable set reuses nothing (the official code crashes on it);
- task_top_k counts over all cameras' tokens together; top_k is per camera;
- statistics are recomputed for the rows they need from each layer's input, instead of taking
  eager attention maps of every layer (same values up to floating-point rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvla.methods.base import PlanContext, ReuseMethod, register
from kvla.engine.plan import ReusePlan

_OFFICIAL_CODE_LAYERS_OF_32 = (2, 6, 9, 11)
# the official code's OpenVLA run (siyuhsu/vla-cache), in parse_method syntax
OFFICIAL_CODE_SPEC = ("vla_cache:top_k=130:relevance_rule=top_k:task_top_k=100:relevance_depth=0.46875:schedule=code"
                      ":change=cosine")


def paper_reuse_ratios(entropy: torch.Tensor, k: float) -> torch.Tensor:
    """alpha_l = min(k * sum_{j<=l} R_j, 1), R_j = (E_{j-1} - E_j) / E_{j-1}; alpha_0 = 0. [B, L]"""
    drops = (entropy[:, :-1] - entropy[:, 1:]) / entropy[:, :-1].clamp_min(1e-12)
    cumulative = torch.cat([torch.zeros_like(entropy[:, :1]), drops.cumsum(1)], dim=1)
    return (k * cumulative).clamp(0.0, 1.0).cummax(1).values


def code_reuse_ratios(entropy: torch.Tensor, smoothing: float, layers: tuple[int, ...]) -> torch.Tensor:
    """The official code's variant: 1 - minmax(E), damped increases, applied only at `layers`. [B, L]"""
    low, high = entropy.min(1, keepdim=True).values, entropy.max(1, keepdim=True).values
    raw = 1.0 - (entropy - low) / (high - low).clamp_min(1e-12)
    smoothed = raw.clone()
    for layer in range(1, raw.shape[1]):
        previous = smoothed[:, layer - 1]
        rising = raw[:, layer] > previous
        smoothed[:, layer] = torch.where(rising, previous + smoothing * (raw[:, layer] - previous), raw[:, layer])
    ratios = torch.zeros_like(raw)
    current = torch.zeros_like(raw[:, 0])
    applied = set(layers)
    for layer in range(raw.shape[1]):
        if layer in applied:
            current = torch.maximum(current, smoothed[:, layer])
        ratios[:, layer] = current
    return ratios


@register
@dataclass
class VLACache(ReuseMethod):
    name = "vla_cache"
    tau: float = 0.996  # static-patch cosine threshold
    top_k: int = 100  # most-static patches kept per camera (paper 100; official code 130 / 150)
    relevance_rule: str = "threshold"  # "threshold" (paper) or "top_k" (official code)
    tau_task: float = 0.5  # threshold on the min-max normalised relevance score
    task_top_k: int = 100  # most-attended patches removed under relevance_rule=top_k (official code: 100)
    relevance_layers: tuple[int, ...] = ()  # decoder layers averaged; () = relevance_depth's layer
    relevance_depth: float | None = None  # relevance layer round(depth * L) when relevance_layers=(); None: L // 2
    schedule: str = "paper"  # "paper", "code" or "none"
    entropy_k: float = 1.0  # k of Eq. 7
    code_smoothing: float = 0.55
    code_layers: tuple[int, ...] = ()  # () = official (2, 6, 9, 11) of 32 scaled to the model's depth
    max_age: int = 0  # force recompute of K/V at least this many steps old (0: never)
    similarity: str = "pixels"  # "pixels" (paper: image patches) or "embeddings" (kvla: decoder inputs)
    change: str = "photometric"  # change rule of pixel patches (methods/change.py): photometric, or cosine (paper)
    levels: float = 2.0  # photometric: largest change of a channel's patch mean or std, in grey levels

    def __post_init__(self):
        if self.relevance_rule not in ("threshold", "top_k"):
            raise ValueError(f"relevance_rule must be 'threshold' or 'top_k', got {self.relevance_rule!r}")
        if self.similarity not in ("pixels", "embeddings"):
            raise ValueError(f"similarity must be 'pixels' or 'embeddings', got {self.similarity!r}")
        from kvla.methods.change import CHANGE_RULES

        if self.change not in CHANGE_RULES:
            raise ValueError(f"change must be one of {', '.join(CHANGE_RULES)}, got {self.change!r}")
        if self.schedule not in ("paper", "code", "none"):
            raise ValueError(f"schedule must be 'paper', 'code' or 'none', got {self.schedule!r}")
        if not 0.0 <= self.tau <= 1.0 or self.top_k < 0 or self.task_top_k < 0:
            raise ValueError("tau must lie in [0, 1] and top_k, task_top_k must be >= 0")
        if self.relevance_depth is not None and self.relevance_layers:
            raise ValueError("give relevance_layers or relevance_depth, not both")
        if self.relevance_depth is not None and not 0.0 <= self.relevance_depth < 1.0:
            raise ValueError(f"relevance_depth must lie in [0, 1), got {self.relevance_depth}")

    def _relevance_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.relevance_layers:
            return self.relevance_layers
        if self.relevance_depth is None:
            return (num_layers // 2,)
        return (min(num_layers - 1, round(self.relevance_depth * num_layers)),)

    def _code_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.code_layers:
            return self.code_layers
        return tuple(sorted({min(num_layers - 1, round(l * num_layers / 32)) for l in _OFFICIAL_CODE_LAYERS_OF_32}))

    def plan(self, ctx: PlanContext) -> ReusePlan:
        state, num_layers = ctx.state, ctx.num_layers
        relevance_layers = self._relevance_layers(num_layers)
        needs_entropy = self.schedule != "none"
        if not state.has_cache or (needs_entropy and state.layer_entropy is None):
            return ctx.full_plan(relevance_layers=relevance_layers, collect_entropy=needs_entropy)

        similarity = (ctx.patch_similarity(self.change, self.levels) if self.similarity == "pixels"
                      else ctx.embedding_similarity())
        static = (similarity >= self.tau) & ctx.reusable_candidates(self.max_age)
        static = self._top_k_per_camera(static, similarity, ctx)
        relevant = self._task_relevant(state.relevance, static)
        reusable = static & ~relevant

        if self.schedule == "none":
            depth = torch.where(reusable, 0, num_layers).long()
        else:
            if self.schedule == "paper":
                ratios = paper_reuse_ratios(state.layer_entropy, self.entropy_k)
                priority = similarity  # most static first
            else:
                ratios = code_reuse_ratios(state.layer_entropy, self.code_smoothing, self._code_layers(num_layers))
                priority = -torch.arange(similarity.shape[1], device=similarity.device).float().expand_as(similarity)
            depth = self._layer_depths(reusable, priority, ratios.to(similarity.device), num_layers)
        notes = {
            "static": static.sum(1).float().mean().item(),
            "relevant_removed": (static & relevant).sum(1).float().mean().item(),
            "reusable": reusable.sum(1).float().mean().item(),
        }
        # the code schedule takes the next step's entropy from this step
        return ReusePlan(visual_depth=depth, relevance_layers=relevance_layers,
                         collect_entropy=self.schedule == "code", notes=notes)

    def _top_k_per_camera(self, static, similarity, ctx: PlanContext) -> torch.Tensor:
        kept = torch.zeros_like(static)
        offset = 0
        for start, end in ctx.layout.visual_spans:
            count = end - start
            score = torch.where(static[:, offset:offset + count], similarity[:, offset:offset + count], -math.inf)
            k = min(self.top_k, count)
            if k > 0:
                top = score.topk(k, dim=1)
                chosen = torch.zeros_like(static[:, offset:offset + count])
                chosen.scatter_(1, top.indices, top.values > -math.inf)
                kept[:, offset:offset + count] = chosen
            offset += count
        return kept

    def _task_relevant(self, relevance: torch.Tensor | None, static: torch.Tensor) -> torch.Tensor:
        if relevance is None:
            return torch.zeros_like(static)
        relevance = relevance.to(static.device)
        if self.relevance_rule == "top_k":
            relevant = torch.zeros_like(static)
            k = min(self.task_top_k, relevance.shape[1])
            if k > 0:
                relevant.scatter_(1, relevance.topk(k, dim=1).indices, True)
            return relevant
        low, high = relevance.min(1, keepdim=True).values, relevance.max(1, keepdim=True).values
        normalised = (relevance - low) / (high - low).clamp_min(1e-12)
        return normalised > self.tau_task

    @staticmethod
    def _layer_depths(reusable, priority, ratios, num_layers) -> torch.Tensor:
        """Token of rank r among n reusable ones is reused from the first layer l with floor(alpha_l n) > r."""
        count = reusable.sum(1, keepdim=True)  # [B, 1]
        score = torch.where(reusable, priority, -math.inf)
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        reused_per_layer = torch.floor(ratios * count).long()  # [B, L], non-decreasing
        # first layer whose quota exceeds the rank; num_layers when none does
        depth = (reused_per_layer[:, None, :] <= rank[:, :, None]).sum(-1)
        return torch.where(reusable, depth, num_layers).long()
