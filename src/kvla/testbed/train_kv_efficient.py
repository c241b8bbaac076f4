"""Training kv_efficient's gate and the LoRA compensation of a history VLA (`kvla train kv-efficient`).

One teacher-forced pass per demonstration episode through the compressed cache the method builds
at inference: block t sees the frames from `first_full_frame(t)` on at full resolution and, of
every chunk that has left the window, its pooled entries (pooled in every layer from that layer's
own K/V, as the method pools its cache). The keep decision of chunk c is relaxed to a binary
concrete sample z_c = sigmoid((l_c + log u - log(1 - u)) / temperature), u ~ U(0, 1), which enters
as log z_c on the attention logits of the chunk's pooled entries (z_c = 1: kept as is, z_c -> 0:
dropped); a chunk the hard KV budget would have dropped by block t (replayed as at inference) is
not seen there at all; the loss is the action cross-entropy plus `memory_weight` times the mean utility
sigmoid(l_c) of the chunks that left the window (a memory penalty). With hard=True the decisions
are the method's own (utility >= keep_threshold): the pass then equals the method's cache path.
The history VLA's weights stay frozen; a LoRA (peft) on the decoder's q and v projections learns
to read pooled entries.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from kvla.engine import compat
from kvla.engine.history import HistoryEngine, attention_dtype
from kvla.methods.base import parse_method
from kvla.methods.kv_efficient import (
    LORA_CONFIG_FILE, LORA_FILE, METHOD_FILE, KVEfficient, KVEfficientModules, KVEfficientModulesConfig, frame_features,
    pooling_matrix,
)
from kvla.model.history import HistoryLayout, frame_embeddings, query_embeddings
from kvla.model.vla import VLAModel


class PoolingKVLayer(DynamicLayer):
    """Appends, after a layer's own K/V of the sequence, the pooled K/V of every chunk."""

    def __init__(self, chunk_rows: torch.Tensor, matrix: torch.Tensor):
        super().__init__()
        self.chunk_rows = chunk_rows  # [chunks, chunk_frames * frame_len] sequence rows of each chunk's frames
        self.matrix = matrix  # [pooled, chunk_frames * frame_len]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not len(self.chunk_rows):
            return key_states, value_states
        batch, heads, _, dim = key_states.shape

        def pooled(states):
            members = states[:, :, self.chunk_rows]  # [B, H, chunks, n, D]
            out = torch.einsum("gn,bhcnd->bhcgd", self.matrix.to(states.dtype), members)
            return out.reshape(batch, heads, -1, dim)

        return (torch.cat([key_states, pooled(key_states)], dim=2),
                torch.cat([value_states, pooled(value_states)], dim=2))

    def get_seq_length(self) -> int:
        return 0


def compressed_sequence_logits(model: VLAModel, engine: HistoryEngine, modules: KVEfficientModules,
                               method: KVEfficient, policy_images: torch.Tensor, proprio: torch.Tensor,
                               text_ids: torch.Tensor, *, hard: bool = False, temperature: float = 0.5,
                               generator: torch.Generator | None = None):
    """Action logits [n, A, vocab] of one episode's n frames through kv_efficient's compressed cache,
    the chunk utility logits [chunks that left the window], and the keep weights z used."""
    layout = HistoryLayout.of(model.config)
    frames = frame_embeddings(model, policy_images, proprio)
    count, device = frames.shape[0], frames.device
    blocks = torch.cat([frames, query_embeddings(model, text_ids.expand(count, -1)).to(frames.dtype)], dim=1)
    embeds = blocks.reshape(1, -1, frames.shape[-1])
    size = method.chunk_frames
    first_full = torch.tensor([method.first_full_frame(t) for t in range(count)], device=device)
    decided = int(first_full.max().item()) // size  # chunks that leave the window before the last block
    features = frame_features(engine, frames[:decided * size])
    logits = torch.zeros(0, device=device)
    if decided:
        logits, _ = modules.chunk_logits(features.reshape(decided, size, -1).mean(1)[None].to(device))
        logits = logits[0]
    if hard:
        keep = (torch.sigmoid(logits) >= method.keep_threshold).float()
    else:
        noise = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(device)
        keep = torch.sigmoid((logits + noise.log() - (-noise).log1p()) / temperature)

    matrix = pooling_matrix(layout, model.config.num_cameras, size, method.spatial_pool).to(device)
    pooled_per_chunk = matrix.shape[0]
    frame_rows = torch.arange(count, device=device)[:, None] * layout.block_len + torch.arange(layout.frame_len, device=device)
    chunk_rows = frame_rows[:decided * size].reshape(decided, size * layout.frame_len)

    length = layout.sequence_len(count)
    index = torch.arange(length, device=device)
    block = index // layout.block_len
    frame_row = index.remainder(layout.block_len) < layout.frame_len
    query_block, key_block = block[:, None], block[None, :]
    visible = (key_block == query_block) & (index[None, :] <= index[:, None])
    visible |= frame_row[None, :] & (key_block < query_block) & (key_block >= first_full[block][:, None])
    dtype = attention_dtype(device, engine.dtype)
    lowest = torch.finfo(dtype).min
    mask = torch.where(visible, 0.0, lowest)
    if decided:
        # the chunks block t sees: those decided before it, less those the hard budget dropped by
        # then (the budget counts the chunks the hard rule keeps, as at inference); with hard
        # decisions, only the kept ones
        utilities = torch.sigmoid(logits.detach().float()).tolist()
        held, budget_dropped = method.replay_budget(layout, pooled_per_chunk, utilities, count)
        chunk = range(decided)
        sees = [[(c + 1) * size <= method.first_full_frame(t) and c not in budget_dropped[t]
                 and (c in held[t] or not hard) for c in chunk] for t in range(count)]
        sees_chunk = torch.tensor(sees, dtype=torch.bool, device=device)[block]  # [L, chunks]
        bias = torch.where(sees_chunk, keep.clamp_min(1e-6).log()[None, :], lowest)
        mask = torch.cat([mask, bias.repeat_interleave(pooled_per_chunk, dim=1)], dim=1)
    mask = mask.clamp_min(lowest).to(dtype)[None, None]

    cache = compat.make_cache([PoolingKVLayer(chunk_rows, matrix) for _ in range(engine.num_layers)])
    hidden = engine.forward(embeds, index[None], mask, cache)
    rows = hidden[0].reshape(count, layout.block_len, -1)[:, -layout.num_action_tokens:]
    return engine.logits(rows), logits, keep


@dataclass
class KVEfficientTrainConfig:
    data: tuple[str, ...]
    out: str
    checkpoint: str = "checkpoints/history-vla-v1"  # the history VLA, kept frozen
    method: str = "kv_efficient"  # its settings (chunk_frames, recent_frames, spatial_pool, ...)
    summary_width: int = 64
    gate_width: int = 128
    lora_rank: int = 8  # 0: no LoRA compensation
    lora_alpha: int = 16
    memory_weight: float = 0.05  # lambda of the memory penalty
    # The gate starts out keeping (utility 0.9) so the LoRA learns to read pooled chunks before the
    # penalty can teach dropping; started at 0.5 with lambda 0.2 it dropped every chunk by step 50.
    initial_keep: float = 0.9
    temperature: float = 0.5
    episodes_per_task: int = 40  # training episodes per task, from the history VLA's training split
    episodes_per_step: int = 2
    lr: float = 5e-4
    max_steps: int = 600
    max_minutes: float = 0.0
    val_episodes_per_task: int = 4
    val_every: int = 100
    log_every: int = 10
    mixed_precision: str = "auto"
    seed: int = 0


def fresh_modules(config: KVEfficientModulesConfig, initial_keep: float) -> KVEfficientModules:
    """Untrained gate modules whose utility head starts at `initial_keep` (its bias)."""
    if not 0.0 < initial_keep < 1.0:
        raise ValueError(f"initial_keep must be in (0, 1), got {initial_keep}")
    modules = KVEfficientModules(config)
    with torch.no_grad():
        modules.utility.bias.fill_(math.log(initial_keep / (1.0 - initial_keep)))
    return modules


def _lora(language_model, rank: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    config = {"r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    return get_peft_model(language_model, LoraConfig(**config)), config


@torch.no_grad()
def validate(model, engine, modules, method, episodes, stride, max_frames, without_lora=contextlib.nullcontext) -> dict:
    """Hard decisions on held-out episodes: loss, agreement of the action tokens with the frozen
    history VLA's own (every frame kept), share of chunks kept."""
    from kvla.model.history import sequence_logits
    from kvla.testbed.train_history import frame_index

    totals = {"loss": 0.0, "agree": 0.0, "tokens": 0, "kept": 0.0, "chunks": 0}
    for episode in episodes:
        index = frame_index(len(episode.targets), stride, 0, max_frames)
        images, proprio = episode.images[index], episode.proprio[index]
        logits, chunk_logits, keep = compressed_sequence_logits(model, engine, modules, method, images, proprio,
                                                                episode.text_ids, hard=True)
        with without_lora():  # the frozen history VLA's own weights
            full = sequence_logits(model, engine, images, proprio, episode.text_ids)
        targets = model.actions_to_tokens(episode.targets[index]).to(logits.device)
        totals["loss"] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        totals["agree"] += (logits.argmax(-1) == full.argmax(-1)).sum().item()
        totals["tokens"] += targets.numel()
        totals["kept"] += keep.sum().item()
        totals["chunks"] += len(keep)
    return {"val_loss": totals["loss"] / totals["tokens"], "val_agreement_with_full": totals["agree"] / totals["tokens"],
            "val_chunks_kept": totals["kept"] / max(totals["chunks"], 1)}


def train_kv_efficient(cfg: KVEfficientTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kvla.model.history import load_history_config
    from kvla.model.reference import InstructionTokenizer, checkpoint_cameras
    from kvla.testbed.data import demo_index
    from kvla.testbed.train import resolve_mixed_precision, restore_training_state, split_demos, warmup_cosine
    from kvla.testbed.train_history import frame_index, load_episodes

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    method = parse_method(cfg.method)
    if not isinstance(method, KVEfficient):
        raise ValueError(f"--method must be kv_efficient with settings, got {cfg.method!r}")
    model = VLAModel.from_pretrained(cfg.checkpoint)
    history = load_history_config(cfg.checkpoint)
    tokenizer = InstructionTokenizer.load(cfg.checkpoint)
    cameras = checkpoint_cameras(cfg.checkpoint)
    layout = HistoryLayout.of(model.config)
    method.budget_entries(layout)  # refuses a budget that cannot hold the window, before any training
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    train_names, val_names = {}, {}
    for path in cfg.data:
        infos = demo_index(path)
        train_infos, val_infos = split_demos(infos, cfg.val_episodes_per_task)
        by_task: dict[str, list] = {}
        for info in train_infos:
            by_task.setdefault(info.task, []).append(info)
        train_names[path] = [i.name for task in by_task.values() for i in task[:cfg.episodes_per_task]]
        val_names[path] = [i.name for i in val_infos]
    train_episodes = load_episodes(cfg.data, train_names, tokenizer, cameras, model.config.action_chunk)
    val_episodes = load_episodes(cfg.data, val_names, tokenizer, cameras, model.config.action_chunk)

    kv_width = 2 * model.language_model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_heads)
    state_path = out / "training_state.pt"
    resuming = resume and state_path.exists()
    modules = KVEfficientModules.load(out / "checkpoint") if resuming else fresh_modules(
        KVEfficientModulesConfig(kv_width, cfg.summary_width, cfg.gate_width), cfg.initial_keep)
    if resuming and modules.config != KVEfficientModulesConfig(kv_width, cfg.summary_width, cfg.gate_width):
        raise ValueError(f"{out / 'checkpoint'} holds modules of another shape ({modules.config}); use another --out")
    modules.train()
    lora_config, peft_model = None, None
    if cfg.lora_rank:
        peft_model, lora_config = _lora(model.language_model, cfg.lora_rank, cfg.lora_alpha)
        if resuming:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            loaded = set_peft_model_state_dict(peft_model, load_file(str(out / "checkpoint" / LORA_FILE)))
            if loaded.unexpected_keys:
                raise ValueError(f"{out / 'checkpoint'} holds a LoRA of another shape; use another --out")
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    model.to(accelerator.device)  # one process: the frozen VLA needs no wrapping, only its place
    modules.to(accelerator.device)
    engine = HistoryEngine(model.language_model)
    parameters = list(modules.parameters()) + [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, 20, cfg.max_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, best = 0, -math.inf
    if resuming:
        saved = restore_training_state(state_path, optimizer, schedule, generator)
        step, best = saved["step"], saved["best"]
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def save(directory: Path):
        modules.save(directory)
        (directory / METHOD_FILE).write_text(json.dumps({
            "method": cfg.method, "checkpoint": cfg.checkpoint, "settings": method.shape_settings(),
            "model_config": asdict(model.config)}, indent=2))
        if lora_config is not None:
            from peft import get_peft_model_state_dict

            state = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
            save_file(state, str(directory / LORA_FILE))
            (directory / LORA_CONFIG_FILE).write_text(json.dumps(lora_config, indent=2))

    def checkpoint(val: dict | None):
        nonlocal best
        score = None if val is None else val["val_agreement_with_full"]
        save(out / "checkpoint")
        if score is not None and score > best:
            best = score
            save(out / "best")
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "step": step, "best": best}, state_path)

    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train kv_efficient", disable=not progress)
    running = {"loss": 0.0, "action": 0.0, "utility": 0.0, "count": 0}
    metrics: dict = {}
    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.episodes_per_step):
            episode = train_episodes[int(torch.randint(len(train_episodes), (1,), generator=generator))]
            phase = int(torch.randint(history.frame_stride, (1,), generator=generator))
            index = frame_index(len(episode.targets), history.frame_stride, phase, history.max_frames)
            with accelerator.autocast():
                logits, chunk_logits, _ = compressed_sequence_logits(
                    model, engine, modules, method, episode.images[index], episode.proprio[index], episode.text_ids,
                    temperature=cfg.temperature, generator=generator)
                targets = model.actions_to_tokens(episode.targets[index]).to(logits.device)
                action_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                utility = torch.sigmoid(chunk_logits.float()).mean() if len(chunk_logits) else action_loss.new_zeros(())
                loss = action_loss + cfg.memory_weight * utility
            (loss / cfg.episodes_per_step).backward()
            running["loss"] += loss.item()
            running["action"] += action_loss.item()
            running["utility"] += utility.item()
            running["count"] += 1
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update(1)
        timed_out = cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes
        if step % cfg.log_every == 0 or step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
            count = max(running["count"], 1)
            metrics = {"step": step, "loss": running["loss"] / count, "action_loss": running["action"] / count,
                       "mean_utility": running["utility"] / count, "lr": schedule.get_last_lr()[0],
                       "minutes": (time.monotonic() - started) / 60}
            running = {"loss": 0.0, "action": 0.0, "utility": 0.0, "count": 0}
            val = None
            if step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
                modules.eval()
                val = validate(model, engine, modules, method, val_episodes, history.frame_stride, history.max_frames,
                               peft_model.disable_adapter if peft_model is not None else contextlib.nullcontext)
                modules.train()
                metrics.update(val)
                checkpoint(val)
            with (out / "log.jsonl").open("a") as log:
                log.write(json.dumps(metrics) + "\n")
        if timed_out:
            break
    bar.close()
    return metrics
