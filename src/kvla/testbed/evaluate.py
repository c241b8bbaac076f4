"""Closed-loop evaluation, paired across methods by seed, and the teacher-forced fidelity proxy."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvla.measure.flops import step_flops
from kvla.measure.stats import paired_difference, wilson_interval
from kvla.methods import method_label, parse_method
from kvla.policy import CachedVLAPolicy

EVAL_SEED_START = 10_000  # held out: demonstrations use seeds from 0


@dataclass
class EpisodeOutcome:
    method: str
    task: str
    seed: int
    success: bool
    steps: int
    step_ms: list[float] = field(default_factory=list)
    vision_ms: list[float] = field(default_factory=list)
    select_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    reuse: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    # per step of a history VLA: the cache after the step, the entries the step attended over, and
    # the attention FLOPs of the step (what the history costs)
    kv_bytes: list[int] = field(default_factory=list)
    attended: list[int] = field(default_factory=list)
    attention_flops: list[float] = field(default_factory=list)
    guard: dict | None = None  # the fidelity guard's summary of the episode (FidelityGuard.summary)


def shade_reused(images: np.ndarray, visual_depth: torch.Tensor, num_layers: int, patch: int) -> np.ndarray:
    """Tint each patch blue by the fraction of layers in which its K/V was reused; the cameras'
    images (uint8 [C, S, S, 3] or one [S, S, 3]) side by side."""
    images = images[None] if images.ndim == 3 else images
    grid = images.shape[1] // patch
    shaded = []
    for camera, image in enumerate(images):
        depth = visual_depth[camera * grid * grid:(camera + 1) * grid * grid]
        reused = (1.0 - depth.float() / num_layers).reshape(grid, grid).numpy()
        alpha = np.kron(reused, np.ones((patch, patch)))[..., None] * 0.5
        tint = np.array([40, 90, 255], dtype=np.float32)
        shaded.append((image * (1 - alpha) + tint * alpha).astype(np.uint8))
    return np.concatenate(shaded, axis=1)


def run_episode(policy, text_ids: torch.Tensor, task: str, seed: int, image_size: int,
                max_steps: int, record: bool = False, cameras: tuple[str, ...] | None = None):
    """One closed-loop episode of a CachedVLAPolicy or a HistoryVLAPolicy; returns (outcome,
    frames with reused patches shaded if record).

    `cameras` are the simulator cameras whose images the model takes, in its visual-token order."""
    from kvla.history_policy import HistoryVLAPolicy
    from kvla.measure.flops import history_attention_flops, history_step_flops
    from kvla.testbed.sim import CAMERA, SimEnv

    cameras = (CAMERA,) if cameras is None else tuple(cameras)
    model = policy.model
    cfg, layers = model.config, policy.engine.num_layers
    history = isinstance(policy, HistoryVLAPolicy)
    # a history VLA sees a frame every frame_stride env steps and executes that many actions of its chunk
    actions_per_call = policy.history.frame_stride if history else cfg.action_chunk
    if len(cameras) != cfg.num_cameras:
        raise ValueError(f"the model takes {cfg.num_cameras} camera(s) but {len(cameras)} were given: {cameras}")
    from kvla.guard import guard_label

    label = method_label(policy.method) + guard_label(getattr(policy, "guard", None))
    outcome = EpisodeOutcome(method=label, task=task, seed=seed, success=False, steps=0)
    frames = []
    policy.reset()
    with SimEnv(task, seed, image_size=image_size, max_steps=max_steps, cameras=cameras) as env:
        observation = env.reset()
        done = False
        while not done:
            images = torch.from_numpy(observation["images"])[None]
            proprio = torch.from_numpy(observation["proprio"])[None] if cfg.proprio_dim else None
            out = policy.step(images, text_ids, proprio)
            outcome.step_ms.append(out.step_ms)
            outcome.vision_ms.append(out.vision_ms)
            outcome.select_ms.append(out.select_ms)
            outcome.prefill_ms.append(out.prefill_ms)
            outcome.decode_ms.append(out.decode_ms)
            if history:
                rows = policy.layout.block_len
                outcome.reuse.append(0.0)
                outcome.flops.append(history_step_flops(cfg, rows, out.attended_entries).total)
                outcome.attention_flops.append(history_attention_flops(cfg, rows, out.attended_entries))
                outcome.kv_bytes.append(out.kv_bytes)
                outcome.attended.append(out.attended_entries)
                if record:
                    frames.append(np.concatenate(list(observation["images"]), axis=1))
            else:
                outcome.reuse.append(out.reuse_ratio)
                outcome.flops.append(step_flops(cfg, model.layout, out.computed_tokens, batch=1,
                                                statistic_rows=out.statistic_rows).total)
                outcome.kv_bytes.append(policy.state.kv_bytes())
                if record:
                    frames.append(shade_reused(observation["images"], out.visual_depth[0].cpu(), layers,
                                               cfg.patch_size))
            chunk = out.actions[0].reshape(cfg.action_chunk, cfg.action_dim).numpy()[:actions_per_call]
            for action in chunk:  # an action chunk is executed open loop, as OpenVLA-OFT does
                observation, success, done = env.step(action)
                outcome.steps += 1
                outcome.success |= success
                if done:
                    break
    if getattr(policy, "guard", None) is not None:
        outcome.guard = policy.guard_summary()
    return outcome, frames


# ------------------------------------------------------------------ worker processes
_WORKER: dict = {}
_USER_MUJOCO_GL = os.environ.get("MUJOCO_GL")  # as the user set it, before ensure_rendering


def _init_worker(checkpoint: str, method_specs: list[str], threads: int):
    from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint

    torch.set_num_threads(threads)
    model, tokenizer = load_policy_checkpoint(checkpoint)
    _WORKER.update(model=model, tokenizer=tokenizer, cameras=checkpoint_cameras(checkpoint),
                   policies=make_policies(checkpoint, model, method_specs))


def reference_method(checkpoint) -> str:
    """What every method of a checkpoint is paired against: `full`, or `history_full` for a history VLA."""
    from kvla.model.history import is_history_checkpoint

    return "history_full" if is_history_checkpoint(checkpoint) else "full"


def make_policies(checkpoint, model, method_specs: list[str]) -> list:
    """One policy per method: CachedVLAPolicy, or HistoryVLAPolicy for a history VLA checkpoint."""
    from kvla.history_policy import HistoryVLAPolicy
    from kvla.model.history import is_history_checkpoint, load_history_config

    from kvla.guard import parse_guarded, split_guard

    if is_history_checkpoint(checkpoint):
        history = load_history_config(checkpoint)
        if any(split_guard(spec)[1] is not None for spec in method_specs):
            raise ValueError("the fidelity guard runs on single-frame VLAs; a history VLA takes none")
        return [HistoryVLAPolicy(model, history, parse_method(spec)) for spec in method_specs]
    # "method|guard:every=10:bound=0.02" puts a fidelity guard on the method
    return [CachedVLAPolicy(model, *parse_guarded(spec)) for spec in method_specs]


def _run_job(job) -> list[EpisodeOutcome]:
    """All methods on one (task, seed), methods in an order rotated by the seed (interleaving)."""
    from kvla.testbed.sim import ALL_TASKS

    task, seed, max_steps = job
    policies = _WORKER["policies"]
    text_ids = _WORKER["tokenizer"].encode_batch([ALL_TASKS[task]])
    shift = seed % len(policies)
    outcomes = [None] * len(policies)
    for index in list(range(shift, len(policies))) + list(range(shift)):
        outcomes[index], _ = run_episode(policies[index], text_ids, task, seed,
                                         _WORKER["model"].config.image_size, max_steps, cameras=_WORKER["cameras"])
    return outcomes


def _ray_job(checkpoint: str, method_specs: list[str], threads: int, job) -> list[EpisodeOutcome]:
    """One job in a Ray worker process, which loads the checkpoint once and keeps it for its next jobs."""
    from kvla.testbed.sim import ensure_rendering

    key = (checkpoint, tuple(method_specs), threads)
    if _WORKER.get("key") != key:
        ensure_rendering()
        _init_worker(checkpoint, method_specs, threads)
        _WORKER["key"] = key
    return _run_job(job)


def _run_on_ray(address: str, checkpoint: str, method_specs: list[str], jobs: list, workers: int, threads: int,
                progress: bool) -> list[list[EpisodeOutcome]]:
    """The jobs as Ray tasks (one CPU each); results in job order, so the pairing is the local one.
    `address` "local" starts a Ray instance on this machine with workers x threads CPUs; otherwise it is
    a running cluster's address ("auto", "ray://head:10001"), whose nodes must see the checkpoint
    directory at the same path and have kvla installed."""
    import ray

    # each node picks its own rendering backend (ensure_rendering in the worker) unless the user chose one
    env_vars = {"OMP_NUM_THREADS": str(threads)}
    if _USER_MUJOCO_GL:
        env_vars["MUJOCO_GL"] = _USER_MUJOCO_GL
    runtime_env = {"env_vars": env_vars}
    if address == "local":
        ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    try:
        run = ray.remote(num_cpus=threads, max_retries=2)(_ray_job)  # a task's threads are its CPUs
        checkpoint = str(Path(checkpoint).resolve())
        pending = [run.remote(checkpoint, method_specs, threads, job) for job in jobs]
        return [ray.get(ref) for ref in tqdm(pending, desc="episodes (ray)", disable=not progress)]
    finally:
        ray.shutdown()


def run_closed_loop(checkpoint: str, method_specs: list[str], tasks: list[str], episodes_per_task: int,
                    *, seed_start: int = EVAL_SEED_START, max_steps: int = 200, workers: int = 2,
                    progress: bool = True, ray_address: str | None = None) -> list[list[EpisodeOutcome]]:
    """Every method on the same (task, seed) pairs; returns per job the outcomes of each method.
    Jobs run in `workers` local processes, or as Ray tasks with `ray_address`."""
    from kvla.testbed.sim import ensure_rendering

    ensure_rendering()  # once, before any worker starts: the workers inherit the backend choice
    jobs = [(task, seed_start + i, max_steps) for i in range(episodes_per_task) for task in tasks]
    threads = max(1, torch.get_num_threads() // max(1, workers))
    if ray_address is not None:
        return _run_on_ray(ray_address, checkpoint, method_specs, jobs, workers, threads, progress)
    if workers <= 1:
        _init_worker(checkpoint, method_specs, threads)
        return [_run_job(job) for job in tqdm(jobs, desc="episodes", disable=not progress)]
    context = mp.get_context("spawn")  # fresh GL contexts and torch threads per worker
    with context.Pool(workers, initializer=_init_worker, initargs=(checkpoint, method_specs, threads)) as pool:
        return list(tqdm(pool.imap(_run_job, jobs), total=len(jobs), desc="episodes", disable=not progress))


# ------------------------------------------------------------------ statistics
@dataclass
class MethodSummary:
    method: str
    task: str  # a task name or "all"
    episodes: int
    success_rate: float
    success_ci: tuple[float, float]
    delta_vs_full: float
    delta_ci: tuple[float, float]
    step_ms: float  # median over all steps
    vision_ms: float  # medians over all steps of each part of the step
    select_ms: float
    prefill_ms: float
    decode_ms: float
    speedup_step: float  # median over episodes of (full's median step ms / this method's)
    reuse_ratio: float
    flops: float  # mean per step
    kv_bytes: float  # median over steps of the KV cache held after the step


def summarise(results: list[list[EpisodeOutcome]], labels: list[str]) -> list[MethodSummary]:
    """Per task and overall, per method; the first label is the reference (`full`)."""
    tasks = sorted({job[0].task for job in results})
    summaries = []
    for task in [*tasks, "all"]:
        jobs = [job for job in results if task == "all" or job[0].task == task]
        reference = [job[0] for job in jobs]
        for index, label in enumerate(labels):
            outcomes = [job[index] for job in jobs]
            successes = [o.success for o in outcomes]
            delta, delta_ci = paired_difference(successes, [r.success for r in reference])
            ratios = [statistics.median(r.step_ms) / statistics.median(o.step_ms) for r, o in zip(reference, outcomes)]
            summaries.append(MethodSummary(
                method=label, task=task, episodes=len(outcomes),
                success_rate=sum(successes) / len(outcomes), success_ci=wilson_interval(sum(successes), len(outcomes)),
                delta_vs_full=delta, delta_ci=delta_ci,
                step_ms=statistics.median([ms for o in outcomes for ms in o.step_ms]),
                **{f"{part}_ms": statistics.median([ms for o in outcomes for ms in getattr(o, f"{part}_ms")] or [math.nan])
                   for part in ("vision", "select", "prefill", "decode")},
                speedup_step=statistics.median(ratios),
                reuse_ratio=statistics.fmean([r for o in outcomes for r in o.reuse]),
                flops=statistics.fmean([f for o in outcomes for f in o.flops]),
                kv_bytes=statistics.median([b for o in outcomes for b in o.kv_bytes] or [math.nan]),
            ))
    return summaries


def summaries_as_json(summaries: list[MethodSummary]) -> list[dict]:
    return [asdict(s) for s in summaries]


def episodes_as_json(results: list[list[EpisodeOutcome]]) -> list[dict]:
    """One record per episode and method, so paired analyses beyond ours can be run on the raw outcomes."""
    return [{"method": o.method, "task": o.task, "seed": o.seed, "success": o.success, "steps": o.steps,
             "step_ms_median": statistics.median(o.step_ms) if o.step_ms else None,
             **{f"{part}_ms_median": statistics.median(getattr(o, f"{part}_ms")) if getattr(o, f"{part}_ms") else None
                for part in ("vision", "select", "prefill", "decode")},
             "reuse_ratio": statistics.fmean(o.reuse) if o.reuse else 0.0,
             **({"guard": o.guard} if o.guard is not None else {})}
            for job in results for o in job]


def plot_success_vs_speedup(summaries: list[MethodSummary], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [s for s in summaries if s.task == "all"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in overall:
        low, high = s.success_ci
        ax.errorbar(s.speedup_step, 100 * s.success_rate, yerr=[[100 * (s.success_rate - low)], [100 * (high - s.success_rate)]],
                    fmt="o", capsize=4, label=s.method)
    ax.set_xlabel("whole-step speed-up vs full (median of paired episode ratios)")
    ax.set_ylabel("success rate, % (95 % Wilson interval)")
    ax.set_title(f"closed loop, {overall[0].episodes} episodes per method" if overall else "closed loop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_video(frames: list[np.ndarray], path, fps: int = 10) -> None:
    """An animated GIF of the episode (frames uint8 [S, C * S, 3]: the cameras side by side)."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * 2, f.shape[0] * 2), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


# ------------------------------------------------------------------ fidelity
@dataclass
class FidelityRecord:
    method: str
    frames: int  # frames the policy acted on
    token_agreement: float  # fraction of action tokens (whole chunks) equal to full's on the same frames
    l1_vs_full: float  # mean |action - full's action|
    l1_vs_demo: float  # mean |action - demonstrated action|
    reuse_ratio: float


def run_fidelity(model, tokenizer, demos, method_specs: list[str], progress: bool = True,
                 perturbation=None) -> list[FidelityRecord]:
    """Feed held-out demonstration episodes (teacher-forced: the recorded observations, not the
    policy's own) to every method at the frames the policy would act on - every frame, or with an
    action chunk of K every K-th frame, as in the closed loop - and compare the whole predicted
    action (chunk) with `full`'s and with the demonstrated actions. `perturbation` (testbed/
    sim.py) is applied to each frame at its env step, the same for every method."""
    from kvla.guard import guard_label, parse_guarded

    specs = list(dict.fromkeys(["full", *method_specs]))
    policies = [CachedVLAPolicy(model, *parse_guarded(spec)) for spec in specs]
    chunk = model.config.action_chunk
    tokens = {i: [] for i in range(len(specs))}
    actions = {i: [] for i in range(len(specs))}
    reuse = {i: [] for i in range(len(specs))}
    demo_actions = []
    for demo in tqdm(demos, desc="fidelity episodes", disable=not progress):
        text_ids = tokenizer.encode_batch([demo.instruction])
        for policy in policies:
            policy.reset()
        length = len(demo.actions)
        for t in range(0, length, chunk):
            frame = demo.images[t] if perturbation is None else perturbation(np.asarray(demo.images[t]), t)
            image = torch.as_tensor(frame)[None]  # [1, (C,) S, S, 3]
            proprio = torch.as_tensor(demo.proprio[t], dtype=torch.float32)[None] if model.config.proprio_dim else None
            for index, policy in enumerate(policies):
                out = policy.step(image, text_ids, proprio)
                tokens[index].append(out.action_tokens[0])
                actions[index].append(out.actions[0])
                reuse[index].append(out.reuse_ratio)
            # the demonstrated chunk t .. t+K-1, the last action repeated past the end (as in training)
            steps = [min(t + k, length - 1) for k in range(chunk)]
            demo_actions.append(torch.as_tensor(demo.actions[steps], dtype=torch.float32).clamp(-1, 1).reshape(-1))
    demo_actions = torch.stack(demo_actions)
    reference_tokens, reference_actions = torch.stack(tokens[0]), torch.stack(actions[0])
    records = []
    for index, spec in enumerate(specs):
        method_tokens, method_actions = torch.stack(tokens[index]), torch.stack(actions[index])
        records.append(FidelityRecord(
            method=method_label(policies[index].method) + guard_label(policies[index].guard), frames=len(method_tokens),
            token_agreement=(method_tokens == reference_tokens).float().mean().item(),
            l1_vs_full=(method_actions - reference_actions).abs().mean().item(),
            l1_vs_demo=(method_actions - demo_actions).abs().mean().item(),
            reuse_ratio=statistics.fmean(reuse[index]),
        ))
    return records
