"""One control step: observation -> plan -> partial prefill -> action decoding -> action."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvla.engine.prefill import PartialPrefillEngine
from kvla.methods import PlanContext, ReuseMethod, parse_method
from kvla.model.inputs import check_step_inputs
from kvla.model.vla import VLAModel
from kvla.engine.state import EpisodeState


def synchronized_clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work (a GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class StepOutput:
    action_tokens: torch.Tensor  # [B, action_dim]
    actions: torch.Tensor  # [B, action_dim] in [-1, 1]
    logits: torch.Tensor  # [B, outputs, vocab] of the prefill
    vision_ms: float
    select_ms: float
    prefill_ms: float
    decode_ms: float
    reuse_ratio: float  # fraction of visual (token, layer) computations skipped
    computed_tokens: list[int]  # rows computed per decoder layer
    statistic_rows: list[int]  # query rows recomputed per decoder layer for attention statistics
    visual_depth: torch.Tensor  # [B, V] layers each visual token was computed in (num_layers: all)
    notes: dict = field(default_factory=dict)
    visible_keys: list[int] | None = None  # per layer, (row, key) pairs the prefill's mask let through (step only)

    @property
    def step_ms(self) -> float:
        return self.vision_ms + self.select_ms + self.prefill_ms + self.decode_ms


class CachedVLAPolicy:
    """A VLA model with a reuse method and the per-episode state; LeRobot-style interface.

    policy = CachedVLAPolicy(model, "vla_cache")
    policy.reset()                      # at the start of every episode
    out = policy.step(frames, text_ids)  # frames uint8 [B, H, W, 3], or [B, cameras, H, W, 3]
    """

    def __init__(self, model: VLAModel, method: ReuseMethod | str = "full", guard=None):
        """guard: a kvla.guard.FidelityGuard that checks the accelerated actions against a full step
        at a cadence and refreshes and tightens reuse when they drift (None: no guard)."""
        self.model = model
        self.guard = guard
        self.method = parse_method(method) if isinstance(method, str) else method
        if getattr(self.method, "kind", "") == "history":
            raise ValueError(f"{self.method.name} is a history method: run it on a history VLA with HistoryVLAPolicy")
        self.engine = PartialPrefillEngine(model.language_model)
        self.state = EpisodeState()

    def reset(self) -> None:
        self.state.reset()

    def _sync(self) -> float:
        return synchronized_clock(self.engine.device)

    def _action_tokens(self, result, state: EpisodeState) -> torch.Tensor:
        """The prefill's action tokens: all at once (parallel layout) or decoded greedily."""
        if self.model.layout.parallel:
            return result.logits.argmax(-1)
        return self.engine.decode_greedy(result.logits[:, -1], self.model.layout, state)

    @torch.no_grad()
    def step(self, images: torch.Tensor, text_ids: torch.Tensor, proprio: torch.Tensor | None = None) -> StepOutput:
        model, engine, layout = self.model, self.engine, self.model.layout
        check_step_inputs(model.config, images, text_ids, proprio)
        start = self._sync()
        policy_images = model.policy_images(images)
        embeds = model.prompt_embeddings(model.encode_images(policy_images), text_ids, proprio)
        after_vision = self._sync()
        patches = model.image_patches(policy_images).to(engine.device)
        ctx = PlanContext(patches=patches, state=self.state, layout=layout, num_layers=engine.num_layers,
                          visual_embeddings=embeds[:, layout.visual_positions.to(embeds.device)])
        plan = self.method.plan(ctx)
        check, oldest_reused = False, None
        if self.guard is not None:
            plan.visual_depth = self.guard.cap(self.state, plan.visual_depth, engine.num_layers)
            changed = None
            if self.state.has_cache and self.guard.on_change:
                changed = 1.0 - (ctx.patch_similarity("photometric") >= 0.996).float().mean().item()
            check = self.guard.should_check(self.state, changed)
            if check:  # the oldest reused age, read before the prefill moves the ages on
                reused = plan.visual_depth < engine.num_layers
                if reused.any():
                    oldest_reused = int(self.state.token_age().to(reused.device)[reused].max())
        after_select = self._sync()
        result = engine.prefill(embeds, layout, plan, self.state, visual_patches=patches)
        after_prefill = self._sync()
        tokens = self._action_tokens(result, self.state)
        end = self._sync()
        actions, notes = model.tokens_to_actions(tokens), dict(plan.notes)
        if self.guard is not None:
            result, tokens, actions, notes["guard"] = self._guard_step(
                check, oldest_reused, embeds, patches, plan, result, tokens, actions, (end - start) * 1e3)
        return StepOutput(
            action_tokens=tokens, actions=actions, logits=result.logits,
            vision_ms=(after_vision - start) * 1e3, select_ms=(after_select - after_vision) * 1e3,
            prefill_ms=(after_prefill - after_select) * 1e3, decode_ms=(end - after_prefill) * 1e3,
            reuse_ratio=result.reuse_ratio(engine.num_layers), computed_tokens=result.computed_tokens,
            statistic_rows=result.statistic_rows, visual_depth=result.visual_depth, notes=notes,
            visible_keys=result.visible_keys.tolist(),
        )

    def _guard_step(self, check, oldest_reused, embeds, patches, plan, result, tokens, actions, step_ms):
        """The guard's part of a step: on a check, the full step from nothing cached; on a breach its
        cache becomes the episode's and its actions are returned."""
        from kvla.engine.plan import ReusePlan

        guard, state, engine, layout = self.guard, self.state, self.engine, self.model.layout
        memory = guard.memory(state)
        note = {"checked": check, "deviation": None, "token_agreement": None, "refreshed": False, "ms": 0.0}
        if check:
            begin = self._sync()
            scratch = EpisodeState()
            scratch.step = state.step - 1  # it stands in for this step of the episode
            full_plan = ReusePlan.full(embeds.shape[0], layout, engine.num_layers, relevance_layers=plan.relevance_layers,
                                       collect_entropy=plan.collect_entropy)
            full = engine.prefill(embeds, layout, full_plan, scratch, visual_patches=patches)
            full_tokens = self._action_tokens(full, scratch)
            full_actions = self.model.tokens_to_actions(full_tokens)
            note["deviation"] = (actions - full_actions).abs().mean().item()
            note["token_agreement"] = (tokens == full_tokens).float().mean().item()
            if guard.record(state, note["deviation"], note["token_agreement"], oldest_reused):
                scratch.method_memory = state.method_memory
                vars(state).update(vars(scratch))  # the full step's K/V and bookkeeping are the episode's now
                result, tokens, actions, note["refreshed"] = full, full_tokens, full_actions, True
            note["ms"] = (self._sync() - begin) * 1e3
        note["max_age"] = memory["max_age"]
        memory["steps"] += 1
        memory["guard_ms"] += note["ms"]
        memory["step_ms"] += step_ms + note["ms"]
        return result, tokens, actions, note

    def guard_summary(self) -> dict:
        """The guard's account of the episode so far: checks, breaches, deviations, its share of the step."""
        if self.guard is None:
            raise ValueError("this policy has no guard")
        return self.guard.summary(self.state)

    @torch.no_grad()
    def step_episodes(self, states: list[EpisodeState], images: torch.Tensor, text_ids: torch.Tensor,
                      proprio: torch.Tensor | None = None) -> list[StepOutput]:
        """One control step of several robots at once: sample i continues the single-sample episode
        `states[i]` (not self.state). Vision runs batched; each episode plans on its own state; the
        episodes whose plans collect the same statistics share one prefill. Each sample's actions
        are what `step` gives on its own state (tests/test_serve_batching.py)."""
        from kvla.engine.episodes import gather_episodes, scatter_episodes
        from kvla.engine.plan import ReusePlan

        model, engine, layout = self.model, self.engine, self.model.layout
        if self.guard is not None:
            raise ValueError("the fidelity guard runs in step(), one episode at a time; step_episodes does not apply it")
        check_step_inputs(model.config, images, text_ids, proprio)
        if len(states) != images.shape[0] or len({id(s) for s in states}) != len(states):
            raise ValueError(f"step_episodes needs one distinct episode state per sample: {len(states)} states "
                             f"for a batch of {images.shape[0]}")
        start = self._sync()
        policy_images = model.policy_images(images)
        embeds = model.prompt_embeddings(model.encode_images(policy_images), text_ids, proprio)
        after_vision = self._sync()
        patches = model.image_patches(policy_images).to(engine.device)
        visual = embeds[:, layout.visual_positions.to(embeds.device)]
        plans = [self.method.plan(PlanContext(patches=patches[i:i + 1], state=state, layout=layout,
                                              num_layers=engine.num_layers, visual_embeddings=visual[i:i + 1]))
                 for i, state in enumerate(states)]
        after_select = self._sync()
        groups: dict[tuple, list[int]] = {}
        for i, plan in enumerate(plans):  # the engine applies these to a whole batch
            key = (plan.relevance_layers, plan.collect_entropy, plan.prune_after_layer, plan.prune_ratio)
            groups.setdefault(key, []).append(i)
        outputs: list[StepOutput | None] = [None] * len(states)
        prefill_ms = decode_ms = 0.0
        for (relevance_layers, collect_entropy, prune_after_layer, prune_ratio), members in groups.items():
            index = torch.tensor(members, device=embeds.device)
            group_states = [states[i] for i in members]
            merged = gather_episodes(group_states, layout, engine.dtype, engine.device)
            plan = ReusePlan(visual_depth=torch.cat([plans[i].visual_depth for i in members]),
                             relevance_layers=relevance_layers, collect_entropy=collect_entropy,
                             prune_after_layer=prune_after_layer, prune_ratio=prune_ratio)
            begin = self._sync()
            result = engine.prefill(embeds[index], layout, plan, merged, visual_patches=patches[index.to(patches.device)])
            after_prefill = self._sync()
            tokens = self._action_tokens(result, merged)
            end = self._sync()
            scatter_episodes(merged, group_states, collected_relevance=result.relevance is not None,
                             collected_entropy=result.layer_entropy is not None)
            prefill_ms += (after_prefill - begin) * 1e3
            decode_ms += (end - after_prefill) * 1e3
            actions = model.tokens_to_actions(tokens)
            for row, i in enumerate(members):
                depth = result.visual_depth[row:row + 1]
                outputs[i] = StepOutput(
                    action_tokens=tokens[row:row + 1], actions=actions[row:row + 1], logits=result.logits[row:row + 1],
                    vision_ms=(after_vision - start) * 1e3, select_ms=(after_select - after_vision) * 1e3,
                    prefill_ms=0.0, decode_ms=0.0,
                    reuse_ratio=result.reuse_ratio(engine.num_layers, slice(row, row + 1)),
                    computed_tokens=result.computed_tokens, statistic_rows=result.statistic_rows,
                    visual_depth=depth, notes=plans[i].notes)
        for output in outputs:  # the batch's prefill and decoding time is every sample's wait
            output.prefill_ms, output.decode_ms = prefill_ms, decode_ms
        return outputs

    def select_action(self, observation: dict) -> torch.Tensor:
        """LeRobot-style: observation {"images": uint8 frames, "text_ids": [B, T], optional "proprio"}
        -> actions [B, action_dim * action_chunk]."""
        if not isinstance(observation, dict):
            raise TypeError(f"observation must be a dict with 'images' and 'text_ids', got {type(observation).__name__}")
        for key in ("images", "text_ids"):
            if key not in observation:
                raise KeyError(f"observation has no {key!r}; it needs 'images' and 'text_ids'")
        return self.step(observation["images"], observation["text_ids"], observation.get("proprio")).actions
