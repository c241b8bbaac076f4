"""Training LAC's selector and ratio predictor on a frozen reference VLA (`kvla train lac`).

Samples are pairs of frames of one demonstration `frame_gap` frames apart (default the VLA's
action chunk: the cadence at which the closed loop calls the policy); the earlier frame's K/V is
the cache. Stage I regresses the selector's saliency onto the frozen VLA's attention to the visual
tokens; stage II trains both modules end to end through the differentiable reuse path
(kvla.engine.mixed). The equations are in kvla.methods.lac.
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

from kvla.engine.mixed import mixed_reuse_forward
from kvla.engine.plan import ReusePlan
from kvla.engine.prefill import PartialPrefillEngine
from kvla.engine.state import EpisodeState
from kvla.methods.lac import DEFAULT_RATIOS, LACModules, LACModulesConfig, selector_inputs
from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
from kvla.testbed.train import DemoFrames, split_demos


@dataclass
class LACTrainConfig:
    checkpoint: str  # the frozen reference VLA
    data: str  # its demonstrations (kvla data collect)
    out: str
    motion: str = "flow"  # "flow" (Farneback) or "difference"
    input_size: int = 64
    width: int = 16
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    episodes_per_task: int = 20  # training episodes loaded per task, from the VLA's own training split
    held_out_per_task: int = 4  # the VLA's held-out episodes (its train_config), never trained on
    val_episodes_per_task: int = 2  # of those, used for validation here
    frame_gap: int = 0  # frames between the cached and the current frame; 0: the VLA's action chunk
    stage1_steps: int = 150
    stage2_steps: int = 900
    batch_size: int = 16
    lr: float = 1e-3
    explore_steps: int = 500  # stage II's first steps: uniformly drawn ratios, selector only (warm-up)
    ratio_weight: float = 0.1  # lambda of L_ratio
    mask_temperature: float = 0.25  # tau_s of the token mask's sigmoid
    gumbel_temperature: float = 1.0
    target: str = "full"  # L_VLA against the full forward's action distribution ("full") or the demonstrations ("demo")
    mixed_precision: str = "auto"  # bf16 autocast of the frozen VLA's forward where native (as `kvla train policy`)
    val_every: int = 250
    log_every: int = 25
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0: no limit
    seed: int = 0


    def __post_init__(self):
        if self.target not in ("demo", "full"):
            raise ValueError(f"target must be 'demo' or 'full', got {self.target!r}")
        if self.explore_steps > self.stage2_steps:
            raise ValueError(f"explore_steps ({self.explore_steps}) is part of stage II ({self.stage2_steps} steps)")


class FramePairs:
    """Frames of demonstrations in memory and every (earlier, current) index pair `gap` apart."""

    def __init__(self, data: str, infos, cameras, tokenizer, gap: int, action_chunk: int):
        from kvla.testbed.data import iter_demos

        self.frames = DemoFrames(iter_demos(data, cameras, [i.name for i in infos]), tokenizer, action_chunk,
                                 total_frames=sum(i.length for i in infos))
        pairs, offset = [], 0
        for info in infos:
            pairs += [(offset + t - gap, offset + t) for t in range(gap, info.length)]
            offset += info.length
        if not pairs:
            raise ValueError(f"no demonstration is longer than the frame gap {gap}")
        self.pairs = torch.tensor(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, index: torch.Tensor):
        earlier, current = self.pairs[index, 0], self.pairs[index, 1]
        f = self.frames
        return (f.images[earlier], f.proprio[earlier], f.images[current], f.proprio[current], f.text_ids[current],
                f.actions[current])


def attention_target(engine: PartialPrefillEngine, embeds: torch.Tensor, layout) -> torch.Tensor:
    """Stage I's target [B, V]: the attention the instruction tokens pay each visual token, mean over
    heads, instruction rows and every decoder layer, min-max scaled per frame to [0, 1]."""
    plan = ReusePlan.full(embeds.shape[0], layout, engine.num_layers,
                          relevance_layers=tuple(range(engine.num_layers)))
    relevance = engine.prefill(embeds, layout, plan, EpisodeState()).relevance
    low, high = relevance.min(1, keepdim=True).values, relevance.max(1, keepdim=True).values
    return (relevance - low) / (high - low).clamp_min(1e-12)


def token_masks(scores: torch.Tensor, ratios: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per ratio r_j, the recompute mask [B, R, V] from saliency logits `scores` (s = sigmoid):
    hard (0 for the round(N r_j) lowest-saliency tokens, 1 otherwise) in the forward pass,
    sigmoid((s - theta_j) / tau_s) in the backward pass, theta_j between the k-th and (k+1)-th
    lowest saliency. theta_j is not detached: raising every saliency alike changes no mask, so it
    gets no gradient either (a detached threshold lets the selector drift into saturation, where
    sigmoid ties would rank by token order)."""
    batch, tokens = scores.shape
    saliency = torch.sigmoid(scores)
    order = scores.argsort(dim=1, stable=True)
    ordered = saliency.gather(1, order)
    ranks = order.argsort(1)
    masks = []
    for ratio in ratios.tolist():
        k = int(round(ratio * tokens))
        if k == 0:
            masks.append(torch.ones_like(saliency))
            continue
        above = ordered[:, k] if k < tokens else ordered[:, -1] + 1.0
        theta = 0.5 * (ordered[:, k - 1] + above)
        soft = torch.sigmoid((saliency - theta[:, None]) / temperature)
        hard = (ranks >= k).to(saliency.dtype)
        masks.append(hard + (soft - soft.detach()))  # exactly hard forward, the sigmoid's gradient backward
    return torch.stack(masks, 1)


class LACTrainer:
    def __init__(self, cfg: LACTrainConfig):
        self.cfg = cfg
        self.model, self.tokenizer = load_policy_checkpoint(cfg.checkpoint)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.engine = PartialPrefillEngine(self.model.language_model)
        self.layout = self.model.layout
        from kvla.testbed.train import resolve_mixed_precision

        self.bf16 = resolve_mixed_precision(cfg.mixed_precision) == "bf16"
        mc = self.model.config
        self.gap = cfg.frame_gap or mc.action_chunk
        self.modules_config = LACModulesConfig(num_cameras=mc.num_cameras, image_size=mc.image_size,
                                               patch_size=mc.patch_size, motion=cfg.motion,
                                               input_size=cfg.input_size, width=cfg.width, ratios=tuple(cfg.ratios))

    def load_data(self):
        from kvla.testbed.data import demo_index

        cfg = self.cfg
        cameras = checkpoint_cameras(cfg.checkpoint)
        train, held_out = split_demos(demo_index(cfg.data), cfg.held_out_per_task)
        chosen, val = [], []
        for infos, limit, into in ((train, cfg.episodes_per_task, chosen), (held_out, cfg.val_episodes_per_task, val)):
            per_task: dict[str, int] = {}
            for info in infos:
                if per_task.get(info.task, 0) < limit:
                    per_task[info.task] = per_task.get(info.task, 0) + 1
                    into.append(info)
        chunk = self.model.config.action_chunk
        self.train_pairs = FramePairs(cfg.data, chosen, cameras, self.tokenizer, self.gap, chunk)
        self.val_pairs = FramePairs(cfg.data, val, cameras, self.tokenizer, self.gap, chunk) if val else None

    def embeddings(self, images, proprio, text_ids):
        model = self.model
        return model.prompt_embeddings(model.encode_images(images), text_ids,
                                       proprio if model.config.proprio_dim else None)

    def autocast(self):
        device = self.model.projector[0].weight.device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16)

    def stage_one_loss(self, modules: LACModules, batch) -> dict:
        earlier, _, current, proprio, text_ids, _ = batch
        with torch.no_grad():  # float32: the engine's prefill runs the model as inference does
            target = attention_target(self.engine, self.embeddings(current, proprio, text_ids), self.layout)
        scores, _ = modules(selector_inputs(current, earlier, modules.config), current.shape[0])
        loss = F.mse_loss(torch.sigmoid(scores), target)
        return {"loss": loss}

    def action_loss(self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor | None) -> torch.Tensor:
        """L_VLA: cross-entropy of the action logits against the demonstrated action tokens
        (target="demo", the paper's), or against the frozen VLA's own full-forward distribution
        (target="full": the KL to what the unaccelerated policy would do, plus its constant entropy)."""
        if self.cfg.target == "demo":
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        teacher = torch.softmax(full_logits.float(), -1)
        return -(teacher * torch.log_softmax(logits.float(), -1)).sum(-1).mean()

    def stage_two_loss(self, modules: LACModules, batch, generator: torch.Generator, explore: bool = False) -> dict:
        """explore: the ratio is drawn uniformly from the set and the predictor does not train
        (stage II's selector warm-up); otherwise Gumbel-softmax over the predictor's logits."""
        cfg = self.cfg
        earlier, earlier_proprio, current, proprio, text_ids, actions = batch
        targets = self.model.actions_to_tokens(actions)
        with torch.no_grad(), self.autocast():
            cache = mixed_reuse_forward(self.engine, self.embeddings(earlier, earlier_proprio, text_ids), self.layout).kv
            embeds = self.embeddings(current, proprio, text_ids)
            full_logits = mixed_reuse_forward(self.engine, embeds, self.layout).logits if cfg.target == "full" else None
        scores, logits = modules(selector_inputs(current, earlier, modules.config), current.shape[0])
        if explore:
            drawn = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=generator)
            choice = F.one_hot(drawn, logits.shape[-1]).to(logits.dtype)
        else:
            gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
            soft = torch.softmax((logits + gumbel) / cfg.gumbel_temperature, -1)
            choice = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype) + (soft - soft.detach())
        mask = (choice[:, :, None] * token_masks(scores, modules.ratios, cfg.mask_temperature)).sum(1)
        with self.autocast():
            out = mixed_reuse_forward(self.engine, embeds, self.layout, cache, mask)
        loss_vla = self.action_loss(out.logits, targets, full_logits)
        expected_ratio = (torch.softmax(logits, -1) * modules.ratios).sum(-1).mean()
        loss = loss_vla if explore else loss_vla - cfg.ratio_weight * expected_ratio
        return {"loss": loss, "loss_vla": loss_vla.detach(), "expected_ratio": expected_ratio.detach(),
                "chosen_ratio": (choice.detach() * modules.ratios).sum(-1).mean()}

    @torch.no_grad()
    def validate(self, modules: LACModules, limit: int = 160, batch_size: int = 32) -> dict:
        """Held-out pairs, in float32 as inference runs, hard top-k masks (inference without recovery):
        at the predicted (argmax) ratio, the action loss against the demonstrations and the
        action-token agreement with the full forward; and the same two at every ratio of the set
        (the selector's trade-off curve, which lambda picks a point of)."""
        if self.val_pairs is None:
            return {}
        modules.eval()
        index = torch.linspace(0, len(self.val_pairs) - 1, min(limit, len(self.val_pairs))).long()
        sums = {"val_loss_full": 0.0, "val_loss_reuse": 0.0, "val_agreement": 0.0, "val_ratio": 0.0,
                "val_attention_mse": 0.0}
        ratios = modules.ratios.tolist()
        curve_loss, curve_agreement = [0.0] * len(ratios), [0.0] * len(ratios)
        count = 0
        for start in range(0, len(index), batch_size):
            chunk = index[start:start + batch_size]
            earlier, earlier_proprio, current, proprio, text_ids, actions = self.val_pairs.batch(chunk)
            targets = self.model.actions_to_tokens(actions)
            cache = mixed_reuse_forward(self.engine, self.embeddings(earlier, earlier_proprio, text_ids), self.layout).kv
            embeds = self.embeddings(current, proprio, text_ids)
            full = mixed_reuse_forward(self.engine, embeds, self.layout).logits
            scores, logits = modules(selector_inputs(current, earlier, modules.config), len(chunk))
            masks = token_masks(scores, modules.ratios, self.cfg.mask_temperature)
            ratio_index = logits.argmax(-1)
            n = len(chunk)
            per_ratio = []
            for j in range(len(ratios)):
                reused = mixed_reuse_forward(self.engine, embeds, self.layout, cache, masks[:, j]).logits
                per_ratio.append(reused)
                curve_loss[j] += F.cross_entropy(reused.flatten(0, 1), targets.flatten()).item() * n
                curve_agreement[j] += (reused.argmax(-1) == full.argmax(-1)).float().mean(-1).sum().item()
            reused = torch.stack(per_ratio, 1)[torch.arange(n), ratio_index]
            sums["val_loss_full"] += F.cross_entropy(full.flatten(0, 1), targets.flatten()).item() * n
            sums["val_loss_reuse"] += F.cross_entropy(reused.flatten(0, 1), targets.flatten()).item() * n
            sums["val_agreement"] += (reused.argmax(-1) == full.argmax(-1)).float().mean(-1).sum().item()
            sums["val_ratio"] += modules.ratios[ratio_index].sum().item()
            sums["val_attention_mse"] += F.mse_loss(torch.sigmoid(scores), attention_target(self.engine, embeds, self.layout)).item() * n
            count += n
        modules.train()
        metrics = {key: value / count for key, value in sums.items()}
        metrics["val_loss_at_ratio"] = [round(v / count, 4) for v in curve_loss]
        metrics["val_agreement_at_ratio"] = [round(v / count, 4) for v in curve_agreement]
        return metrics


def train_lac(cfg: LACTrainConfig, resume: bool = False, progress: bool = True, stop_at_step: int = 0) -> dict:
    """Stage I then stage II; checkpoints (safetensors + config) in cfg.out, resumable.

    stop_at_step: stop (and checkpoint) once this many steps are done, as a time limit would."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    trainer = LACTrainer(cfg)
    trainer.load_data()
    modules = LACModules(trainer.modules_config)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(cfg.seed)
    total = cfg.stage1_steps + cfg.stage2_steps
    step, previous_minutes = 0, 0.0
    state_path = out / "training_state.pt"
    if resume and state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        modules = LACModules.load(out / "checkpoint").train()
        if modules.config != trainer.modules_config:
            raise ValueError(f"{out / 'checkpoint'} holds modules of another shape ({modules.config}); this run "
                             f"would train {trainer.modules_config}: resume with the settings it was started with")
        optimizer = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.01)
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, previous_minutes = saved["step"], saved["minutes"]
    modules.train()
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    started = time.monotonic()
    minutes = lambda: previous_minutes + (time.monotonic() - started) / 60  # noqa: E731

    def learning_rate(s: int) -> float:
        # each stage: short warm-up, cosine decay
        stage_start, length = (0, cfg.stage1_steps) if s < cfg.stage1_steps else (cfg.stage1_steps, cfg.stage2_steps)
        progress_in_stage = (s - stage_start) / max(1, length)
        return cfg.lr * min(1.0, (s - stage_start + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress_in_stage))

    def checkpoint():
        modules.save(out / "checkpoint")
        torch.save({"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                    "minutes": minutes()}, state_path)

    log_path = out / "log.jsonl"
    bar = tqdm(total=total, initial=step, desc="train lac", disable=not progress)
    running: dict[str, float] = {}
    since_log, metrics = 0, {}
    while step < total:
        stage = 1 if step < cfg.stage1_steps else 2
        if step == cfg.stage1_steps and stage == 2 and cfg.stage1_steps:
            optimizer = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.01)  # fresh for stage II
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        index = torch.randint(0, len(trainer.train_pairs), (cfg.batch_size,), generator=generator)
        batch = trainer.train_pairs.batch(index)
        if stage == 1:
            parts = trainer.stage_one_loss(modules, batch)
        else:
            parts = trainer.stage_two_loss(modules, batch, generator,
                                           explore=step < cfg.stage1_steps + cfg.explore_steps)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        for key, value in parts.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        since_log += 1
        timed_out = bool(cfg.max_minutes and minutes() >= cfg.max_minutes) or step == stop_at_step
        stage_end = step in (cfg.stage1_steps, total)
        if step % cfg.log_every == 0 or step % cfg.val_every == 0 or stage_end or timed_out:
            metrics = {"step": step, "stage": stage, "explore": stage == 2 and step <= cfg.stage1_steps + cfg.explore_steps,
                       "lr": learning_rate(step - 1), "minutes": minutes(),
                       **{key: value / since_log for key, value in running.items()}}
            running, since_log = {}, 0
            if step % cfg.val_every == 0 or stage_end or timed_out:
                metrics.update(trainer.validate(modules))
                checkpoint()
            with log_path.open("a") as log:
                log.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if timed_out:
            break
    bar.close()
    return metrics
