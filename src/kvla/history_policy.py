"""One control step of a history VLA: frame -> one block through the decoder over the kept history
-> action chunk -> the history method edits what the next step will see."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvla.engine.history import HistoryEngine, HistoryError, HistoryState
from kvla.methods.base import parse_method
from kvla.methods.history_base import HistoryContext, HistoryMethod
from kvla.model.history import (
    HistoryConfig, HistoryLayout, block_kinds, frame_embeddings, query_embeddings,
)
from kvla.model.inputs import InputError, check_step_inputs
from kvla.model.vla import VLAModel
from kvla.policy import synchronized_clock


class InstructionChangedError(HistoryError, InputError):
    """A history episode's instruction changed: the input is refused and the episode kept."""

    def __init__(self, field: str, message: str):
        InputError.__init__(self, field, message)


@dataclass
class HistoryStepOutput:
    action_tokens: torch.Tensor  # [B, A]
    actions: torch.Tensor  # [B, A] in [-1, 1]
    logits: torch.Tensor  # [B, A, vocab]
    vision_ms: float
    prefill_ms: float  # the step's block through the decoder, over the kept history
    select_ms: float  # the history method's edit of the cache after the step
    attended_entries: int  # history entries the step's block attended over
    kv_bytes: int  # bytes the cache holds after the step (what the next step attends over)
    entries: int  # entries the cache holds after the step
    notes: dict = field(default_factory=dict)

    @property
    def decode_ms(self) -> float:
        return 0.0

    @property
    def step_ms(self) -> float:
        return self.vision_ms + self.prefill_ms + self.select_ms


class HistoryVLAPolicy:
    """A history VLA with a history method and the per-episode state.

    policy = HistoryVLAPolicy(model, history_config, "history_window:frames=8")
    policy.reset()                                 # at the start of every episode
    out = policy.step(frames, text_ids, proprio)   # one call per `history_config.frame_stride` env steps
    """

    def __init__(self, model: VLAModel, history: HistoryConfig, method: HistoryMethod | str = "history_full"):
        self.history = history
        self.method = parse_method(method) if isinstance(method, str) else method
        if getattr(self.method, "kind", "") != "history":
            raise ValueError(f"{self.method.name} is not a history method; a history VLA takes "
                             "history_full, history_window, no_history or kv_efficient")
        if not 1 <= history.frame_stride <= model.config.action_chunk:
            raise ValueError(f"frame_stride {history.frame_stride} must be 1..{model.config.action_chunk} (the action "
                             "chunk): the policy executes frame_stride actions of each chunk")
        self.model = self.method.prepare_model(model)
        model = self.model
        self.layout = HistoryLayout.of(model.config)
        self.engine = HistoryEngine(model.language_model)
        self.state = HistoryState()
        self.budget = self.method.budget_entries(self.layout)

    def reset(self) -> None:
        self.state.reset()

    def _sync(self) -> float:
        return synchronized_clock(self.engine.device)

    @torch.no_grad()
    def step(self, images: torch.Tensor, text_ids: torch.Tensor, proprio: torch.Tensor) -> HistoryStepOutput:
        model, engine, layout, state = self.model, self.engine, self.layout, self.state
        check_step_inputs(model.config, images, text_ids, proprio)
        start = self._sync()
        frame = frame_embeddings(model, model.policy_images(images), proprio)
        batch = frame.shape[0]
        after_vision = self._sync()
        if state.text_ids is None:
            state.text_ids = text_ids.detach().cpu().clone()
        elif not torch.equal(state.text_ids, text_ids.detach().cpu()):
            raise InstructionChangedError("text_ids", "the instruction changed within an episode: call reset() for a "
                                                      "new episode")
        attended = state.num_entries
        block = torch.cat([frame, query_embeddings(model, text_ids).to(frame.dtype)], dim=1)
        kinds, frames = block_kinds(layout, state.step)
        hidden = engine.extend(state, block, layout.block_positions(state.step), kinds, frames)
        logits = engine.logits(hidden[:, -layout.num_action_tokens:]).float()
        state.crop(state.num_entries - layout.query_len)  # nobody else reads a step's instruction and placeholders
        state.step += 1
        after_prefill = self._sync()
        notes = self.method.after_step(HistoryContext(state, layout, engine, frame, model.config.num_cameras))
        if self.budget is not None and state.num_entries > self.budget:
            raise HistoryError(f"{self.method.name} left {state.num_entries} cache entries, over its budget of "
                               f"{self.budget}")
        state.peak_entries = max(state.peak_entries, state.num_entries)
        end = self._sync()
        tokens = logits.argmax(-1)
        return HistoryStepOutput(
            action_tokens=tokens, actions=model.tokens_to_actions(tokens), logits=logits,
            vision_ms=(after_vision - start) * 1e3, prefill_ms=(after_prefill - after_vision) * 1e3,
            select_ms=(end - after_prefill) * 1e3, attended_entries=attended, kv_bytes=state.kv_bytes(),
            entries=state.num_entries, notes=notes or {},
        )
