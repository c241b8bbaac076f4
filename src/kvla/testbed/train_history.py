"""Behaviour cloning of the history VLA on whole demonstration episodes (`kvla train history`).

Each training sample is one episode from its first frame, frames `frame_stride` env steps apart
(a random phase in [0, stride) picks which), at most `max_frames` of them, read as one causal
sequence (kvla.model.history): every frame's action chunk is predicted with all earlier frames
as context, in one forward. With probability `window_probability` the sample's blocks see only
the last W earlier frames (W uniform in 0..max_window), so the model also knows the contexts the
history_window and no_history baselines build. It starts from a single-frame reference VLA's
weights (the same modules) and fine-tunes all of them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvla.engine.history import HistoryEngine
from kvla.model.history import HistoryConfig, sequence_logits, save_history_config
from kvla.model.reference import InstructionTokenizer, checkpoint_cameras
from kvla.model.vla import VLAModel
from kvla.testbed.train import (
    random_shift, resolve_mixed_precision, restore_training_state, save_observation_spec, split_demos, warmup_cosine,
)


@dataclass
class HistoryTrainConfig:
    data: tuple[str, ...]  # demonstration files (MT10 and the memory variants)
    out: str
    init_from: str = "checkpoints/reference-vla-v2"  # a single-frame reference VLA (resume uses out/checkpoint)
    frame_stride: int = 4
    max_frames: int = 50
    window_probability: float = 0.3
    max_window: int = 8
    episodes_per_step: int = 2  # episodes whose gradients one optimizer step sums
    mixed_precision: str = "auto"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 3000
    max_minutes: float = 0.0
    val_episodes_per_task: int = 4
    val_every: int = 250
    log_every: int = 25
    shift_pixels: int = 4
    seed: int = 0


@dataclass
class Episode:
    task: str
    images: torch.Tensor  # uint8 [T, cameras, S, S, 3]
    proprio: torch.Tensor  # [T, P]
    targets: torch.Tensor  # [T, A] continuous action chunks (the last action repeated past the end)
    text_ids: torch.Tensor  # [1, T_text]


def load_episodes(paths, names_by_path, tokenizer: InstructionTokenizer, cameras, action_chunk: int) -> list[Episode]:
    from kvla.testbed.data import iter_demos

    episodes = []
    for path in paths:
        for demo in iter_demos(path, cameras, names_by_path[path]):
            length = len(demo.actions)
            actions = torch.as_tensor(demo.actions, dtype=torch.float32).clamp(-1, 1)
            index = (torch.arange(length)[:, None] + torch.arange(action_chunk)[None]).clamp(max=length - 1)
            episodes.append(Episode(demo.task, torch.as_tensor(demo.images), torch.as_tensor(demo.proprio),
                                    actions[index].reshape(length, -1),
                                    torch.tensor([tokenizer.encode(demo.instruction)])))
    return episodes


def frame_index(length: int, stride: int, phase: int, max_frames: int) -> torch.Tensor:
    return torch.arange(phase, length, stride)[:max_frames]


def episode_loss(model: VLAModel, engine: HistoryEngine, episode: Episode, index: torch.Tensor,
                 window: int | None, images: torch.Tensor | None = None):
    images = episode.images[index] if images is None else images
    logits = sequence_logits(model, engine, images, episode.proprio[index], episode.text_ids, window)
    targets = model.actions_to_tokens(episode.targets[index])
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, logits, targets


@torch.no_grad()
def evaluate_episodes(model: VLAModel, engine: HistoryEngine, episodes: list[Episode], stride: int,
                      max_frames: int) -> dict:
    """Teacher-forced loss and token accuracy on held-out episodes from their first frame, with
    the whole history and with none, per task set (mt10, memory)."""
    from kvla.testbed.sim import MEMORY_TASKS

    model.eval()
    sums: dict[str, list[float]] = {}
    for episode in episodes:
        group = "memory" if episode.task in MEMORY_TASKS else "mt10"
        index = frame_index(len(episode.targets), stride, 0, max_frames)
        for label, window in (("full", None), ("none", 0)):
            loss, logits, targets = episode_loss(model, engine, episode, index, window)
            entry = sums.setdefault(f"{group}_{label}", [0.0, 0.0, 0.0])
            entry[0] += loss.item() * targets.numel()
            entry[1] += (logits.argmax(-1) == targets).sum().item()
            entry[2] += targets.numel()
    metrics = {}
    for key, (loss, correct, count) in sums.items():
        metrics[f"val_loss_{key}"] = loss / count
        metrics[f"val_accuracy_{key}"] = correct / count
    metrics["val_loss"] = sum(s[0] for k, s in sums.items() if k.endswith("_full")) / \
        sum(s[2] for k, s in sums.items() if k.endswith("_full"))
    return metrics


def train_history(cfg: HistoryTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kvla.testbed.data import demo_cameras, demo_index

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    history = HistoryConfig(cfg.frame_stride, cfg.max_frames)
    state_path = out / "training_state.pt"
    start_from = out / "checkpoint" if resume and state_path.exists() else Path(cfg.init_from)
    model = VLAModel.from_pretrained(start_from)
    tokenizer = InstructionTokenizer.load(start_from)
    cameras = checkpoint_cameras(start_from)
    if history.frame_stride > model.config.action_chunk:
        raise ValueError(f"frame_stride {history.frame_stride} is longer than the model's action chunk "
                         f"{model.config.action_chunk}: the steps between frames would have no action")
    train_names, val_names = {}, {}
    for path in cfg.data:
        missing = [c for c in cameras if c not in demo_cameras(path)]
        if missing:
            raise ValueError(f"{path} has no frames from camera(s) {', '.join(missing)} that {start_from} reads")
        infos = demo_index(path)
        unknown = sorted({i.instruction for i in infos if tokenizer.unknown_words(i.instruction)})
        if unknown:
            raise ValueError(f"{start_from}'s tokenizer does not know the words of {unknown}")
        train_infos, val_infos = split_demos(infos, cfg.val_episodes_per_task)
        train_names[path], val_names[path] = [i.name for i in train_infos], [i.name for i in val_infos]
    train_episodes = load_episodes(cfg.data, train_names, tokenizer, cameras, model.config.action_chunk)
    val_episodes = load_episodes(cfg.data, val_names, tokenizer, cameras, model.config.action_chunk)

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)
    engine = HistoryEngine(plain.language_model)
    model.train()
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, best = 0, math.inf
    if resume and state_path.exists():
        saved = restore_training_state(state_path, optimizer, schedule, generator)
        step, best = saved["step"], saved["best_val_loss"]

    log_path = out / "log.jsonl"
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train history", disable=not progress)

    def checkpoint(val: dict | None):
        nonlocal best
        improved = val is not None and val["val_loss"] < best
        for directory in [out / "checkpoint"] + ([out / "best"] if improved else []):
            plain.save_pretrained(directory)
            tokenizer.save(directory)
            save_observation_spec(directory, cameras, plain.config.image_size)
            save_history_config(directory, history)
        if improved:
            best = val["val_loss"]
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "step": step, "best_val_loss": best}, state_path)

    running, metrics = {"loss": 0.0, "accuracy": 0.0, "frames": 0.0, "count": 0}, {}
    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.episodes_per_step):
            episode = train_episodes[int(torch.randint(len(train_episodes), (1,), generator=generator))]
            phase = int(torch.randint(cfg.frame_stride, (1,), generator=generator))
            index = frame_index(len(episode.targets), cfg.frame_stride, phase, cfg.max_frames)
            windowed = torch.rand((), generator=generator).item() < cfg.window_probability
            window = int(torch.randint(cfg.max_window + 1, (1,), generator=generator)) if windowed else None
            images = random_shift(episode.images[index], cfg.shift_pixels, generator)
            with accelerator.autocast():
                loss, logits, targets = episode_loss(plain, engine, episode, index, window, images)
            accelerator.backward(loss / cfg.episodes_per_step)
            running["loss"] += loss.item()
            running["accuracy"] += (logits.argmax(-1) == targets).float().mean().item()
            running["frames"] += len(index)
            running["count"] += 1
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update(1)
        timed_out = cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes
        if step % cfg.log_every == 0 or step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
            count = max(running["count"], 1)
            metrics = {"step": step, "loss": running["loss"] / count, "token_accuracy": running["accuracy"] / count,
                       "frames_per_episode": running["frames"] / count, "lr": schedule.get_last_lr()[0],
                       "minutes": (time.monotonic() - started) / 60}
            running = {"loss": 0.0, "accuracy": 0.0, "frames": 0.0, "count": 0}
            val = None
            if step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
                val = evaluate_episodes(plain, engine, val_episodes, cfg.frame_stride, cfg.max_frames)
                metrics.update(val)
                checkpoint(val)
                model.train()
            with log_path.open("a") as log:
                log.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.2f}")
        if timed_out:
            break
    bar.close()
    model.eval()
    return metrics
