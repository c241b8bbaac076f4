"""Behaviour cloning of the reference VLA on the demonstrations (`kvla train policy`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvla.model.vla import VLAModel
from kvla.model.reference import InstructionTokenizer, reference_config


@dataclass
class TrainConfig:
    data: str
    out: str
    parallel: bool = True  # OFT-style: all action positions in one pass
    action_chunk: int = 4  # future steps predicted at once (needs parallel)
    layers: int = 8  # decoder layers
    cameras: tuple[str, ...] = ()  # cameras of the data file to train on; () = all it recorded
    mixed_precision: str = "auto"  # "auto" (bf16 where native: GPU, AVX512-BF16 CPU), "no", "bf16" or "fp16"
    init_from: str = ""  # start from this checkpoint's weights with a fresh optimizer and schedule (not --resume)
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 20000
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0: no limit
    val_episodes_per_task: int = 4  # held-out episodes (the highest seeds of each task)
    val_every: int = 500
    log_every: int = 50
    shift_pixels: int = 4  # random-shift augmentation
    seed: int = 0
    mask_mode: str = "causal"  # the prompt's attention (causal, prefix_lm, bidirectional); with init_from: the new one


class DemoFrames:
    """All frames of a set of demonstrations in memory, with their action (chunk) targets.

    Filled demo by demo into preallocated tensors, so the frames are held once (two cameras of
    85k frames at 128 px are 8 GB of uint8).
    """

    def __init__(self, demos, tokenizer: InstructionTokenizer, action_chunk: int, total_frames: int | None = None):
        demos = demos if total_frames is not None else list(demos)
        total = total_frames if total_frames is not None else sum(len(d.actions) for d in demos)
        self.images = self.proprio = self.actions = self.text_ids = None
        offset = 0
        for demo in demos:
            length = len(demo.actions)
            acts = torch.as_tensor(demo.actions, dtype=torch.float32).clamp(-1, 1)
            # chunk t = actions t .. t+K-1, the last action repeated past the end
            index = (torch.arange(length)[:, None] + torch.arange(action_chunk)[None]).clamp(max=length - 1)
            images = torch.as_tensor(demo.images)
            if images.dim() == 4:  # [T, S, S, 3]: one camera
                images = images[:, None]
            text = torch.tensor(tokenizer.encode(demo.instruction))
            if self.images is None:
                self.images = torch.empty((total, *images.shape[1:]), dtype=torch.uint8)
                self.proprio = torch.empty((total, demo.proprio.shape[-1]), dtype=torch.float32)
                self.actions = torch.empty((total, action_chunk * acts.shape[-1]), dtype=torch.float32)
                self.text_ids = torch.empty((total, len(text)), dtype=torch.long)
            if offset + length > total:
                raise ValueError(f"demonstrations hold more than the {total} frames announced")
            self.images[offset:offset + length] = images
            self.proprio[offset:offset + length] = torch.as_tensor(demo.proprio, dtype=torch.float32)
            self.actions[offset:offset + length] = acts[index].reshape(length, -1)
            self.text_ids[offset:offset + length] = text
            offset += length
        if offset != total or self.images is None:
            raise ValueError(f"demonstrations hold {offset} frames, {total} were announced")

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, index: torch.Tensor):
        return self.images[index], self.proprio[index], self.text_ids[index], self.actions[index]


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each uint8 image [..., S, S, 3] by up to `pixels` (edge-padded), a standard BC augmentation.

    Every image (each camera of each sample) gets its own shift.
    """
    if pixels <= 0:
        return images
    lead, size = images.shape[:-3], images.shape[-3]
    flat = images.reshape(-1, *images.shape[-3:])
    padded = F.pad(flat.permute(0, 3, 1, 2).float(), (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (flat.shape[0], 2), generator=generator)
    shifted = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])
    return shifted.permute(0, 2, 3, 1).to(torch.uint8).reshape(*lead, *images.shape[-3:])


def action_logits(model: VLAModel, images, proprio, text_ids, action_tokens) -> torch.Tensor:
    """Teacher-forced logits [B, A, vocab] of the action tokens, computed as inference does."""
    layout = model.layout
    visual = model.encode_images(images if images.dim() == 5 else images[:, None])
    embeds = model.prompt_embeddings(visual, text_ids, proprio)
    backbone = model.language_model.model
    if not layout.parallel:
        previous_actions = model.language_model.get_input_embeddings()(action_tokens[:, :-1])
        embeds = torch.cat([embeds, previous_actions], dim=1)
    mask = None
    if layout.mask_mode != "causal":  # a 4-D mask is taken as given: the prompt's blocks, then causal
        allowed = layout.attention_allowed(embeds.shape[1], device=embeds.device)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[None, None].expand(embeds.shape[0], 1, -1, -1)
    hidden = backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    hidden = hidden[:, layout.action_span[0]:] if layout.parallel else hidden[:, layout.seq_len - 1:]
    return model.language_model.lm_head(hidden)


@torch.no_grad()
def evaluate_frames(model: VLAModel, frames: DemoFrames, batch_size: int = 64, limit: int = 2048) -> dict:
    """Teacher-forced loss, token accuracy and L1 of the decoded actions on held-out frames."""
    model.eval()
    device = model.projector[0].weight.device
    index = torch.linspace(0, len(frames) - 1, min(limit, len(frames))).long()
    losses, correct, l1, count = 0.0, 0, 0.0, 0
    for start in range(0, len(index), batch_size):
        images, proprio, text_ids, actions = (t.to(device) for t in frames.batch(index[start:start + batch_size]))
        targets = model.actions_to_tokens(actions)
        logits = action_logits(model, images, proprio, text_ids, targets)
        losses += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        predicted = logits.argmax(-1)
        correct += (predicted == targets).sum().item()
        l1 += (model.tokens_to_actions(predicted) - actions).abs().sum().item()
        count += targets.numel()
    return {"val_loss": losses / count, "val_token_accuracy": correct / count, "val_action_l1": l1 / count}


def split_demos(demos, val_per_task: int):
    """Hold out the `val_per_task` highest-seed episodes of every task."""
    by_task: dict[str, list] = {}
    for demo in demos:
        by_task.setdefault(demo.task, []).append(demo)
    train, val = [], []
    for task_demos in by_task.values():
        task_demos.sort(key=lambda d: d.seed)
        cut = len(task_demos) - val_per_task if len(task_demos) > val_per_task else len(task_demos)
        train += task_demos[:cut]
        val += task_demos[cut:]
    return train, val


def save_observation_spec(directory, cameras: tuple[str, ...], image_size: int) -> None:
    """sim.json: which simulator cameras, in which order, the checkpoint's visual tokens come from."""
    Path(directory, "sim.json").write_text(json.dumps({"cameras": list(cameras), "image_size": image_size}))


def resolve_mixed_precision(setting: str) -> str:
    """accelerate's mixed_precision for `setting`; "auto": bf16 on a GPU or on a CPU with native
    bf16 arithmetic (AVX512-BF16 or AMX), else "no" (emulated bf16 is slower and no more exact)."""
    if setting != "auto":
        if setting not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {setting!r}")
        return setting
    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def warmup_cosine(optimizer, warmup_steps: int, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then a cosine to 0 at `max_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max_steps))))


def restore_training_state(path, optimizer, schedule, generator) -> dict:
    """Load a training_state.pt's optimizer, schedule and data-order generator; returns the rest of it."""
    saved = torch.load(path, weights_only=False)
    optimizer.load_state_dict(saved.pop("optimizer"))
    schedule.load_state_dict(saved.pop("schedule"))
    generator.set_state(saved.pop("generator"))
    return saved


def _check_continuation(directory: Path, config, cameras: tuple[str, ...], image_size: int, cfg: TrainConfig) -> None:
    """A run that starts from a checkpoint (--resume, --init-from) must have that checkpoint's shape."""
    from kvla.model.reference import checkpoint_cameras

    theirs = (checkpoint_cameras(directory), config.image_size, config.parallel_actions, config.action_chunk,
              config.num_layers)
    ours = (cameras, image_size, cfg.parallel, cfg.action_chunk, cfg.layers)
    if theirs != ours:
        names = ("cameras", "image size", "parallel", "action chunk", "layers")
        differ = ", ".join(f"{n} {t} (this run: {o})" for n, t, o in zip(names, theirs, ours) if t != o)
        raise ValueError(f"{directory} does not match this run: it has {differ}")


def train_policy(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kvla.testbed.data import demo_cameras, demo_image_size, demo_index, iter_demos
    from kvla.testbed.sim import TASKS

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    infos = demo_index(cfg.data)
    if not infos:
        raise ValueError(f"{cfg.data} holds no demonstrations")
    cameras = tuple(cfg.cameras) or demo_cameras(cfg.data)
    image_size = demo_image_size(cfg.data)
    instructions = sorted({d.instruction for d in infos})

    state_path = out / "training_state.pt"
    start_from = out / "checkpoint" if resume and state_path.exists() else Path(cfg.init_from) if cfg.init_from else None
    if start_from is not None:
        model = VLAModel.from_pretrained(start_from)
        tokenizer = InstructionTokenizer.load(start_from)
        _check_continuation(start_from, model.config, cameras, image_size, cfg)
        unknown = [text for text in instructions if tokenizer.unknown_words(text)]
        if unknown:
            raise ValueError(f"{start_from}'s tokenizer does not know the words of {unknown}")
        if model.config.mask_mode != cfg.mask_mode:
            if resume and state_path.exists():
                raise ValueError(f"{start_from} was trained with mask_mode {model.config.mask_mode!r}, this run asks "
                                 f"for {cfg.mask_mode!r}: resume with the same mask mode")
            # fine-tuning a checkpoint under another mask: same weights, the new prompt attention
            model.config = replace(model.config, mask_mode=cfg.mask_mode)
            model.layout = model.config.layout()
    else:
        tokenizer = InstructionTokenizer.from_instructions(sorted(set(TASKS.values()) | set(instructions)))
        model = VLAModel(replace(reference_config(tokenizer, parallel=cfg.parallel, action_chunk=cfg.action_chunk,
                                                  num_layers=cfg.layers, num_cameras=len(cameras),
                                                  image_size=image_size), mask_mode=cfg.mask_mode))
    train_infos, val_infos = split_demos(infos, cfg.val_episodes_per_task)

    def frames_of(selected):
        return DemoFrames(iter_demos(cfg.data, cameras, [i.name for i in selected]), tokenizer, cfg.action_chunk,
                          total_frames=sum(i.length for i in selected))

    train_frames = frames_of(train_infos)
    val_frames = frames_of(val_infos) if val_infos else None

    # accelerate keeps one precision state per process; a fresh one per run lets a process train twice
    AcceleratorState._reset_state(reset_partial_state=True)
    # accelerate owns device placement and mixed precision (bf16 autocast on this CPU, AMP on a GPU)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
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
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not progress)
    metrics: dict = {}

    def checkpoint(val: dict | None):
        nonlocal best
        plain = accelerator.unwrap_model(model)
        for directory in [out / "checkpoint"] + ([out / "best"] if val is not None and val["val_loss"] < best else []):
            plain.save_pretrained(directory)
            tokenizer.save(directory)
            save_observation_spec(directory, cameras, image_size)
        if val is not None and val["val_loss"] < best:
            best = val["val_loss"]
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "step": step, "best_val_loss": best}, state_path)

    running_loss, running_accuracy, since_log = 0.0, 0.0, 0
    while step < cfg.max_steps:
        index = torch.randint(0, len(train_frames), (cfg.batch_size,), generator=generator)
        images, proprio, text_ids, actions = train_frames.batch(index)
        images = random_shift(images, cfg.shift_pixels, generator)
        plain = accelerator.unwrap_model(model)
        targets = plain.actions_to_tokens(actions).to(accelerator.device)
        with accelerator.autocast():
            logits = action_logits(plain, images, proprio.to(accelerator.device), text_ids.to(accelerator.device), targets)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        bar.update(1)
        running_loss += loss.item()
        running_accuracy += (logits.argmax(-1) == targets).float().mean().item()
        since_log += 1
        timed_out = cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes
        if step % cfg.log_every == 0 or step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
            metrics = {"step": step, "loss": running_loss / since_log, "token_accuracy": running_accuracy / since_log,
                       "lr": schedule.get_last_lr()[0], "minutes": (time.monotonic() - started) / 60}
            running_loss, running_accuracy, since_log = 0.0, 0.0, 0
            val = None
            if step % cfg.val_every == 0 or step == cfg.max_steps or timed_out:
                # validated in float32, as the policy runs at inference
                val = evaluate_frames(plain, val_frames) if val_frames is not None else None
                metrics.update(val or {})
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
