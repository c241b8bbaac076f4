"""`kv_efficient`: KV-Efficient VLA, an RNN-gated chunked KV cache over the history frames
(arXiv 2509.21354, "KV-Efficient VLA: A Method to Speed up Vision Language Models with RNN-Gated
Chunked KV Cache").

The paper keeps past frames' tokens as context, cuts the history KV cache into fixed-size chunks,
summarises each chunk with an MLP, runs an LSTM gate over the chunk summaries to score their
utility, keeps a recent window at full resolution, keeps high-utility older chunks compressed
and drops the rest, with causality kept; a LoRA compensation of the VLA is fine-tuned with it.
It gives no chunk size, window, widths, keep rule or loss; kvla's choices (all settings here):

- a chunk is `chunk_frames` consecutive frames (a frame's entries: BOS, visual tokens, proprio);
- the last `recent_frames` frames stay at full resolution; a chunk leaves the window once all of
  its frames are older than that, and is decided then, once;
- its summary: the mean over the chunk's entries of its first decoder layer's keys and values
  (before RoPE; the first layer's K/V do not depend on the history, so training can run the
  whole episode's gate before the decoder), through an MLP of width `summary_width`;
- the gate: a one-layer LSTM of width `gate_width` over the summaries in time order (the
  authors' proof of concept uses width 128), a linear head, a sigmoid utility;
- keep (utility >= `keep_threshold`): the chunk is pooled to one entry per `spatial_pool` x
  `spatial_pool` patch group of each camera plus one BOS and one proprio entry, averaged over
  the chunk's frames (mean pooling of post-RoPE K/V, as the proof of concept pools a chunk);
  drop: its entries leave the cache;
- a hard budget `kv_budget` entries: while the cache holds more, the kept chunk of lowest
  utility is dropped; the default, 1040, is what `history_window:frames=8` holds on the
  reference history VLA (130 entries a frame).

Training (`kvla train kv-efficient`): the gate and a LoRA of the decoder, on demonstrations,
through the same compressed cache in one teacher-forced pass per episode; each chunk's keep
decision is relaxed to a binary-concrete sample z, added to the attention logits of its pooled
entries as log z; loss = action cross-entropy + lambda * mean utility (a memory penalty).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kvla.engine.history import FRAME, HistoryError, HistoryState
from kvla.methods.base import register
from kvla.methods.history_base import HistoryContext, HistoryMethod
from kvla.model.history import HistoryLayout

MODULES_FILE, CONFIG_FILE, LORA_FILE, LORA_CONFIG_FILE, METHOD_FILE = (
    "kv_efficient_modules.safetensors", "kv_efficient_config.json", "lora.safetensors", "lora_config.json",
    "method.json")


@dataclass(frozen=True)
class KVEfficientModulesConfig:
    kv_width: int  # the first layer's key width + value width
    summary_width: int = 64
    gate_width: int = 128


class KVEfficientModules(nn.Module):
    """Chunk summary MLP, LSTM gate and utility head."""

    def __init__(self, config: KVEfficientModulesConfig):
        super().__init__()
        self.config = config
        self.summary = nn.Sequential(nn.Linear(config.kv_width, config.summary_width), nn.GELU(),
                                     nn.Linear(config.summary_width, config.summary_width))
        self.gate = nn.LSTM(config.summary_width, config.gate_width, batch_first=True)
        self.utility = nn.Linear(config.gate_width, 1)

    def chunk_logits(self, features: torch.Tensor, memory=None):
        """Utility logits [B, chunks] of chunk features [B, chunks, kv_width] in time order, and
        the LSTM state to continue from."""
        output, memory = self.gate(self.summary(features), memory)
        return self.utility(output).squeeze(-1), memory

    def save(self, directory) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / MODULES_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory) -> "KVEfficientModules":
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in (CONFIG_FILE, MODULES_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory} has no {name}: train it with `kvla train kv-efficient`")
        modules = cls(KVEfficientModulesConfig(**json.loads((directory / CONFIG_FILE).read_text())))
        load_model(modules, str(directory / MODULES_FILE))
        return modules.eval()


def frame_features(engine, frame_embeddings: torch.Tensor) -> torch.Tensor:
    """[B, kv_width]: the mean over a frame's entries of its first decoder layer's keys and values
    (before RoPE), from the frame's decoder inputs [B, F, hidden]."""
    layer = engine.parts.layers[0]
    normed = layer.input_layernorm(frame_embeddings)
    keys, values = layer.self_attn.k_proj(normed), layer.self_attn.v_proj(normed)
    return torch.cat([keys.mean(1), values.mean(1)], dim=-1).float()


def pooling_matrix(layout: HistoryLayout, cameras: int, chunk_frames: int, spatial_pool: int) -> torch.Tensor:
    """[pooled entries, chunk_frames * frame_len]: each pooled entry the mean of its members over
    the chunk's frames (one BOS entry, the patch groups of each camera, one proprio entry)."""
    patches = layout.num_visual // cameras
    grid = int(round(patches ** 0.5))
    if grid * grid != patches or grid % spatial_pool:
        raise ValueError(f"spatial_pool {spatial_pool} must divide the {grid} x {grid} patch grid")
    groups = [[0]]
    cells = grid // spatial_pool
    for camera in range(cameras):
        for cell_y in range(cells):
            for cell_x in range(cells):
                groups.append([1 + camera * patches + (cell_y * spatial_pool + dy) * grid + cell_x * spatial_pool + dx
                               for dy in range(spatial_pool) for dx in range(spatial_pool)])
    groups.append([layout.frame_len - 1])
    matrix = torch.zeros(len(groups), chunk_frames * layout.frame_len)
    for row, members in enumerate(groups):
        for frame in range(chunk_frames):
            matrix[row, [frame * layout.frame_len + m for m in members]] = 1.0 / (len(members) * chunk_frames)
    return matrix


@register
@dataclass
class KVEfficient(HistoryMethod):
    name = "kv_efficient"
    modules: str = "checkpoints/kv-efficient-v1"  # trained gate (and LoRA) directory
    chunk_frames: int = 2
    recent_frames: int = 4
    spatial_pool: int = 2
    keep_threshold: float = 0.5
    kv_budget: int = 1040  # cache entries between steps; 8 frames of the reference history VLA (130 entries each)
    lora: bool = True  # merge the trained LoRA compensation into the VLA, if the modules have one

    def __post_init__(self):
        if self.chunk_frames < 1 or self.recent_frames < 0 or self.spatial_pool < 1:
            raise ValueError("kv_efficient needs chunk_frames >= 1, recent_frames >= 0, spatial_pool >= 1")
        if not 0.0 <= self.keep_threshold <= 1.0:
            raise ValueError(f"keep_threshold must be in [0, 1], got {self.keep_threshold}")
        self._modules: KVEfficientModules | None = None

    # ------------------------------------------------------------------ shared with training
    def first_full_frame(self, frames_seen: int) -> int:
        """The oldest frame still at full resolution once `frames_seen` frames have been seen: whole
        chunks leave the recent window together."""
        out_of_window = max(frames_seen - self.recent_frames, 0)
        return out_of_window // self.chunk_frames * self.chunk_frames

    def full_resolution_entries(self, layout: HistoryLayout) -> int:
        """The most full-resolution entries held between steps: the window and a partly left chunk."""
        return (self.recent_frames + self.chunk_frames - 1) * layout.frame_len

    def budget_entries(self, layout: HistoryLayout) -> int:
        if self.kv_budget < self.full_resolution_entries(layout):
            raise ValueError(f"kv_budget {self.kv_budget} cannot hold the recent window: it needs "
                             f"{self.full_resolution_entries(layout)} entries ({self.recent_frames} recent frames and "
                             f"a chunk of {self.chunk_frames} leaving, {layout.frame_len} entries a frame)")
        return self.kv_budget

    def replay_budget(self, layout: HistoryLayout, pooled_per_chunk: int, utilities: list[float],
                      frames: int) -> tuple[list[set[int]], list[set[int]]]:
        """What after_step leaves in the cache before each block t < frames, from the chunks'
        utilities (in order): per block, the kept chunks held, and the kept chunks the budget has
        dropped by then. Training builds its mask from this, so that the budget binds there as here."""
        held: dict[int, float] = {}
        budget_dropped: set[int] = set()
        decided, held_per_block, dropped_per_block = 0, [], []
        for block in range(frames):
            first_full = self.first_full_frame(block)
            while (decided + 1) * self.chunk_frames <= first_full:
                if utilities[decided] >= self.keep_threshold:
                    held[decided] = utilities[decided]
                decided += 1
            while (block - first_full) * layout.frame_len + len(held) * pooled_per_chunk > self.kv_budget and held:
                weakest = min(held, key=held.get)
                del held[weakest]
                budget_dropped.add(weakest)
            held_per_block.append(set(held))
            dropped_per_block.append(set(budget_dropped))
        return held_per_block, dropped_per_block

    def load_modules(self) -> KVEfficientModules:
        if self._modules is None:
            self._modules = KVEfficientModules.load(self.modules)
        return self._modules

    def prepare_model(self, model):
        """The VLA with the trained LoRA compensation merged into a copy of its weights (the
        caller's model is left as it is); the model itself without one. Checks first that the
        modules were trained for this model and these settings."""
        self.load_modules()
        self.check_trained_for(model)
        path = Path(self.modules)
        if not self.lora or not (path / LORA_FILE).exists():
            return model
        return merge_lora(model, path)

    def shape_settings(self) -> dict:
        """The settings the gate and the LoRA are trained for."""
        return {"chunk_frames": self.chunk_frames, "recent_frames": self.recent_frames,
                "spatial_pool": self.spatial_pool}

    def check_trained_for(self, model) -> None:
        path = Path(self.modules) / METHOD_FILE
        if not path.exists():
            return  # modules saved without a record (tests build them by hand)
        trained = json.loads(path.read_text())
        differ = [f"{k}={v} (trained: {trained['settings'][k]})" for k, v in self.shape_settings().items()
                  if trained["settings"].get(k) != v]
        if differ:
            raise ValueError(f"{self.modules} was trained with other kv_efficient settings: {', '.join(differ)}")
        if trained.get("model_config") not in (None, asdict(model.config)):
            raise ValueError(f"{self.modules} was trained on another history VLA ({trained.get('checkpoint')}); "
                             "train the gate for this model with `kvla train kv-efficient`")

    # ------------------------------------------------------------------ inference
    def after_step(self, ctx: HistoryContext) -> dict:
        state, layout = ctx.state, ctx.layout
        if state.batch_size != 1:
            raise HistoryError("kv_efficient decides per episode: run one robot per policy (batch 1)")
        modules = self.load_modules()
        memory = state.method_memory.setdefault(self.name, {"features": {}, "lstm": None, "utility": {}, "decided": 0})
        memory["features"][state.step - 1] = frame_features(ctx.engine, ctx.frame_embeddings)[0].cpu()
        cameras = ctx.cameras
        kept = dropped = 0
        while (memory["decided"] + 1) * self.chunk_frames <= self.first_full_frame(state.step):
            chunk = memory["decided"]
            frames = range(chunk * self.chunk_frames, (chunk + 1) * self.chunk_frames)
            features = torch.stack([memory["features"].pop(f) for f in frames]).mean(0)
            with torch.no_grad():
                logit, memory["lstm"] = modules.chunk_logits(features[None, None], memory["lstm"])
            utility = torch.sigmoid(logit).item()
            start, end = _frame_run(state, frames.start, frames.stop)
            if utility >= self.keep_threshold:
                matrix = pooling_matrix(layout, cameras, self.chunk_frames, self.spatial_pool)
                keys, values = [], []
                for layer in state.layers():
                    weights = matrix.to(layer.keys.device, layer.keys.dtype)
                    keys.append(torch.einsum("gn,bhnd->bhgd", weights, layer.keys[:, :, start:end]))
                    values.append(torch.einsum("gn,bhnd->bhgd", weights, layer.values[:, :, start:end]))
                state.replace_run(start, end, keys, values, frame=frames.start)
                memory["utility"][chunk] = utility
                kept += 1
            else:
                state.keep(torch.cat([torch.arange(start), torch.arange(end, state.num_entries)]))
                dropped += 1
            memory["decided"] += 1
        budget_drops = 0
        while state.num_entries > self.kv_budget:
            if not memory["utility"]:
                raise HistoryError(f"kv_efficient holds {state.num_entries} entries with no chunk left to drop "
                                   f"(budget {self.kv_budget})")
            chunk = min(memory["utility"], key=memory["utility"].get)
            del memory["utility"][chunk]
            keep = state.entry_frame != chunk * self.chunk_frames
            state.keep(torch.nonzero(keep).flatten())
            budget_drops += 1
        return {"chunks_kept": kept, "chunks_dropped": dropped, "budget_drops": budget_drops}


def _frame_run(state: HistoryState, first: int, stop: int) -> tuple[int, int]:
    """[start, end) of the full-resolution entries of frames first..stop-1 (contiguous in the cache)."""
    members = torch.nonzero((state.entry_frame >= first) & (state.entry_frame < stop)).flatten()
    if not len(members) or (state.entry_kind[members] != FRAME).any():
        raise HistoryError(f"frames {first}..{stop - 1} are not held at full resolution")
    start, end = members[0].item(), members[-1].item() + 1
    if end - start != len(members):
        raise HistoryError(f"frames {first}..{stop - 1} are not contiguous in the cache")
    return start, end


def merge_lora(model, directory):
    """A copy of `model` with the LoRA adapter saved in `directory` merged into its decoder."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    merged = copy.deepcopy(model)
    config = LoraConfig(**json.loads((directory / LORA_CONFIG_FILE).read_text()))
    peft_model = get_peft_model(merged.language_model, config)
    loaded = set_peft_model_state_dict(peft_model, load_file(str(directory / LORA_FILE)))
    if loaded.unexpected_keys:
        raise ValueError(f"{directory / LORA_FILE} holds weights this model has no place for: "
                         f"{loaded.unexpected_keys[:3]}")
    merged.language_model = peft_model.merge_and_unload()
    return merged.eval()
