"""The `kvla` command line."""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from kvla.methods import METHODS, parse_method

app = typer.Typer(help="kvla: exact KV reuse for VLA policies.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: latency and FLOPs.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(width=160)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _machine() -> str:
    device = f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}"
    return device


@bench_app.command("latency")
def bench_latency(
    preset: str = typer.Option("base", help="Model preset: tiny, small, base, openvla-7b."),
    model_name: str = typer.Option(None, "--model", help="A transformers VLM host of a published shape instead of "
                                   "a preset: smolvla:cpu, smolvla, paligemma:cpu, paligemma:3b, smolvlm:tiny, "
                                   "paligemma:tiny (random weights)."),
    methods: str = typer.Option("full,vla_cache", help="Comma-separated methods, settings as name:key=value:key=value."),
    frames: Path = typer.Option(None, help="An .npz with uint8 frames [T,H,W,3]; default: the bundled MetaWorld episode."),
    steps: int = typer.Option(0, help="Use only the first N frames (0: all)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    seed: int = typer.Option(0, help="Seed of the random weights and prompt."),
    json_path: Path = typer.Option(None, "--json", help="Write one record per method here."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Median step and prefill latency of each method over the same frames, interleaved."""
    from kvla.measure.latency import records_as_json, run_latency
    from kvla.measure.frames import load_frames
    from kvla.model.vla import PRESETS, VLAModel

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}", param_hint="--dtype")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    specs = [s for s in methods.split(",") if s.strip()]
    try:
        for spec in specs:
            parse_method(spec)
        if model_name is None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        if model_name is not None:
            from kvla.hosts.presets import HOST_PRESETS

            if model_name not in HOST_PRESETS:
                raise ValueError(f"unknown host model {model_name!r}; choose from {', '.join(HOST_PRESETS)}")
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if threads:
        torch.set_num_threads(threads)
    episode = load_frames(frames)
    if model_name is not None:
        from kvla.hosts.presets import host_preset

        model = host_preset(model_name, seed=seed).to(device=device, dtype=_DTYPES[dtype])
        described = f"model {model_name} ({model.config.host}, {model.config.family}, {model.layout.mask_mode} prompt)"
    else:
        model = VLAModel.from_preset(preset, seed=seed).to(device=device, dtype=_DTYPES[dtype])
        described = f"preset {preset}"
    records = run_latency(model, specs, episode, steps=steps or None, text_seed=seed, progress=progress)
    machine = torch.cuda.get_device_name() if device == "cuda" else _machine()
    table = Table(title=f"kvla bench latency - {described}, {dtype}, {machine}, {records[0].steps} steps of {episode.source}")
    for column in ("method", "step ms", "prefill ms", "speed-up step", "speed-up prefill", "reuse", "GFLOPs",
                   "KV MB", "select ms", "select % step"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in records:
        table.add_row(r.method, f"{r.step_ms:.1f}", f"{r.prefill_ms:.1f}", f"{r.speedup_step:.2f}x",
                      f"{r.speedup_prefill:.2f}x", f"{r.reuse_ratio:.1%}", f"{r.flops / 1e9:.1f}",
                      f"{r.kv_bytes / 2**20:.1f}", f"{r.select_ms:.2f}", f"{r.select_ms / r.step_ms:.1%}")
    console.print(table)
    if json_path:
        from kvla.measure.receipt import make_receipt, write_receipt

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(records_as_json(records), indent=2))
        source = {"host_model": model_name} if model_name is not None else {"preset": preset}
        receipt = make_receipt(
            "kvla bench latency", model={**source, "seed": seed, "weights": "random, from the seed"},
            methods=[parse_method(s) for s in dict.fromkeys(["full", *specs])], device=device, dtype=_DTYPES[dtype],
            agreement={r.method: {"token_agreement": r.token_agreement_with_full, "l1_vs_full": r.l1_vs_full}
                       for r in records},
            extra={"frames": episode.source, "steps": records[0].steps})
        console.print(f"wrote {json_path} and {write_receipt(json_path, receipt)}")


@bench_app.command("history")
def bench_history(
    checkpoint: Path = typer.Option(Path("checkpoints/history-vla-v1"), help="A history VLA checkpoint."),
    methods: str = typer.Option("history_window,no_history,kv_efficient",
                                help="Comma-separated history methods; history_full always runs, as the reference."),
    task: str = typer.Option("push-hidden-goal-v3", help="The task whose scripted-expert episode gives the frames."),
    seed: int = typer.Option(10_000, help="Its seed."),
    env_steps: int = typer.Option(200, help="Env steps of the episode (the expert keeps acting after success)."),
    at_step: int = typer.Option(150, help="The episode step the table reports."),
    repeats: int = typer.Option(3, help="Runs of the episode; latency is the median over them."),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    json_path: Path = typer.Option(None, "--json", help="Write every method's curves here."),
    plot: Path = typer.Option(None, help="Write KV bytes, attention FLOPs and latency against the episode step here."),
    progress: bool = typer.Option(True),
):
    """KV memory, attention FLOPs and step latency of history methods as the episode goes on."""
    from kvla.measure.history_costs import curves_as_json, plot_history_costs, record_expert_frames, run_history_costs
    from kvla.model.history import is_history_checkpoint
    from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
    from kvla.testbed import evaluate
    from kvla.testbed.sim import ALL_TASKS, parse_tasks

    if not is_history_checkpoint(checkpoint):
        raise typer.BadParameter(f"{checkpoint} is not a history VLA checkpoint", param_hint="--checkpoint")
    specs = list(dict.fromkeys(["history_full", *[s for s in methods.split(",") if s.strip()]]))
    try:
        parse_tasks(task)
        for spec in specs:
            if getattr(parse_method(spec), "kind", "") != "history":
                raise ValueError(f"{spec} is not a history method")
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if not 0 <= at_step < env_steps:
        raise typer.BadParameter(f"must be within the episode's {env_steps} env steps", param_hint="--at-step")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_policy_checkpoint(checkpoint)
    policies = evaluate.make_policies(checkpoint, model, specs)
    stride = policies[0].history.frame_stride
    images, proprio = record_expert_frames(task, seed, env_steps, stride, model.config.image_size,
                                           checkpoint_cameras(checkpoint))
    labels = [evaluate.method_label(p.method) for p in policies]
    curves = run_history_costs(policies, labels, images, proprio, tokenizer.encode_batch([ALL_TASKS[task]]), stride,
                               repeats=repeats, progress=progress)
    table = Table(title=f"kvla bench history - {checkpoint}, {task} seed {seed}, at env step {at_step}, "
                        f"{_machine()}, median of {repeats} runs")
    for column in ("method", "frames' worth attended", "KV MiB held", "KV less than full", "attention GFLOPs", "step ms",
                   "speed-up"):
        table.add_column(column, justify="left" if column == "method" else "right")
    reference = curves[0].at(at_step)
    for curve in curves:
        row = curve.at(at_step)
        frames = row["attended"] / policies[0].layout.frame_len
        table.add_row(curve.method, f"{frames:.1f}", f"{row['kv_bytes'] / 2**20:.2f}",
                      f"{reference['kv_bytes'] / row['kv_bytes']:.2f}x" if row["kv_bytes"] else "-",
                      f"{row['attention_flops'] / 1e9:.2f}",
                      f"{row['step_ms']:.1f}", f"{row['speedup']:.2f}x")
    console.print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"checkpoint": str(checkpoint), "task": task, "seed": seed,
                                         "at_step": at_step, "machine": _machine(), "repeats": repeats,
                                         "curves": curves_as_json(curves)}, indent=2))
        from kvla.measure.receipt import checkpoint_digest, make_receipt, write_receipt

        receipt = make_receipt(
            "kvla bench history", model={"checkpoint": str(checkpoint), "sha256": checkpoint_digest(checkpoint)},
            methods=[p.method for p in policies], device=policies[0].engine.device, dtype=policies[0].engine.dtype,
            agreement={c.method: {"token_agreement": c.token_agreement_with_full, "l1_vs_full": c.l1_vs_full}
                       for c in curves},
            agreement_note="against history_full over the same frames (the first repeat)",
            extra={"task": task, "seed": seed, "env_steps": env_steps, "repeats": repeats})
        console.print(f"wrote {json_path} and {write_receipt(json_path, receipt)}")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_history_costs(curves, plot, marker_step=at_step)
        console.print(f"wrote {plot}")


@bench_app.command("flops")
def bench_flops(
    preset: str = typer.Option("openvla-7b", help="Model preset."),
    prompt_tokens: int = typer.Option(285, help="Prompt length N (OpenVLA on LIBERO: BOS + 256 visual + ~28 text)."),
    json_path: Path = typer.Option(None, "--json", help="Write prefill_flops and prefill_macs here."),
):
    """Decoder-prefill FLOPs of the preset's language model for an N-token prompt (no head)."""
    from kvla.measure.flops import plain_prefill_macs
    from kvla.model.vla import preset_config

    if prompt_tokens < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--prompt-tokens")
    try:
        config = preset_config(preset)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--preset") from None
    macs = plain_prefill_macs(config, prompt_tokens)
    console.print(f"preset {preset}: decoder prefill of {prompt_tokens} tokens, {config.num_layers} layers, "
                  f"hidden {config.hidden_size}, MLP {config.intermediate_size}")
    console.print(f"  {2 * macs:.4e} FLOPs = {macs:.4e} multiply-accumulates ({macs / 1e12:.3f} T MACs)")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"preset": preset, "prompt_tokens": prompt_tokens,
                                         "prefill_flops": 2 * macs, "prefill_macs": macs}, indent=2))
        console.print(f"wrote {json_path}")


@app.command("methods")
def list_methods():
    """The reuse methods and their settings (defaults)."""
    for name, cls in sorted(METHODS.items()):
        settings = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/bold]: {doc}\n  {settings or '(no settings)'}")


@app.command("presets")
def list_presets():
    """The model presets."""
    from kvla.model.vla import PRESETS

    for name, cfg in PRESETS.items():
        console.print(f"[bold]{name}[/bold]: {cfg.family} decoder {cfg.num_layers}x{cfg.hidden_size}, "
                      f"{cfg.num_visual} visual tokens ({cfg.image_size}px / {cfg.patch_size}px patches), "
                      f"prompt {cfg.layout().seq_len} tokens")
    from kvla.hosts.presets import HOST_PRESETS

    console.print("VLM hosts for `kvla bench latency --model` (random weights, published shapes; built on use): "
                  + ", ".join(HOST_PRESETS))


def main():  # pragma: no cover
    app()


# ---------------------------------------------------------------------------------- testbed
train_app = typer.Typer(help="Training.", no_args_is_help=True)
app.add_typer(train_app, name="train")


from kvla.testbed.data import data_app  # noqa: E402 - metaworld and h5py are imported only when a command runs

app.add_typer(data_app, name="data", help="Demonstrations: collect with the scripted experts.")


@train_app.command("policy")
def train_policy_command(
    data: Path = typer.Option(Path("data/metaworld_mt10.hdf5"), help="Demonstrations (HDF5, robomimic layout)."),
    out: Path = typer.Option(Path("runs/policy"), help="Output directory: checkpoint/, best/, log.jsonl."),
    parallel: bool = typer.Option(True, help="OpenVLA-OFT style: all action positions in one pass "
                                              "(--no-parallel: OpenVLA-style autoregressive)."),
    action_chunk: int = typer.Option(4, help="Future steps per prediction (needs --parallel)."),
    layers: int = typer.Option(8, help="Decoder layers."),
    cameras: str = typer.Option("", help="Comma-separated cameras of the data to train on (default: all recorded)."),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 on a GPU or a CPU with native bf16), no, bf16 or fp16."),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(3e-4),
    max_steps: int = typer.Option(20000),
    max_minutes: float = typer.Option(0.0, help="Stop and checkpoint after this wall time (0: no limit)."),
    val_every: int = typer.Option(500),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    resume: bool = typer.Option(False, help="Continue from OUT/training_state.pt."),
    init_from: Path = typer.Option(None, help="Start from this checkpoint's weights, fresh optimizer and schedule."),
    mask_mode: str = typer.Option("causal", help="The prompt's attention: causal (OpenVLA), prefix_lm (actions "
                                                 "causal after a bidirectional prefix) or bidirectional (OpenVLA-OFT)."),
    progress: bool = typer.Option(True),
):
    """Behaviour cloning of the reference VLA on the demonstrations, with held-out validation episodes."""
    from kvla.testbed.train import TrainConfig, train_policy

    if not data.exists():
        raise typer.BadParameter(f"{data} does not exist: run `kvla data collect` first", param_hint="--data")
    if action_chunk > 1 and not parallel:
        raise typer.BadParameter("action chunks need --parallel", param_hint="--action-chunk")
    if threads:
        torch.set_num_threads(threads)
    if mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise typer.BadParameter("choose auto, no, bf16 or fp16", param_hint="--mixed-precision")
    if mask_mode not in ("causal", "prefix_lm", "bidirectional"):
        raise typer.BadParameter("choose causal, prefix_lm or bidirectional", param_hint="--mask-mode")
    cfg = TrainConfig(mask_mode=mask_mode, data=str(data), out=str(out), parallel=parallel, action_chunk=action_chunk, layers=layers,
                      cameras=tuple(c.strip() for c in cameras.split(",") if c.strip()),
                      mixed_precision=mixed_precision, init_from=str(init_from or ""), batch_size=batch_size, lr=lr, max_steps=max_steps, max_minutes=max_minutes,
                      val_every=val_every, seed=seed)
    metrics = train_policy(cfg, resume=resume, progress=progress)
    console.print(f"final: {json.dumps(metrics)}")


@train_app.command("lac")
def train_lac_command(
    checkpoint: Path = typer.Option(Path("checkpoints/reference-vla-v2"), help="The reference VLA (kept frozen)."),
    data: Path = typer.Option(Path("data/mt10_wrist.hdf5"), help="Its demonstrations (kvla data collect)."),
    out: Path = typer.Option(Path("runs/lac"), help="Output: checkpoint/ (the modules), log.jsonl, training state."),
    motion: str = typer.Option("flow", help="Selector's motion input: flow (Farneback) or difference."),
    episodes_per_task: int = typer.Option(20, help="Training episodes per task, from the VLA's own training split."),
    stage1_steps: int = typer.Option(150, help="Stage I: saliency regressed onto the VLA's attention."),
    stage2_steps: int = typer.Option(900, help="Stage II: end to end through the reuse relaxation."),
    explore_steps: int = typer.Option(500, help="Stage II's first steps: uniformly drawn ratios, selector only."),
    target: str = typer.Option("full", help="L_VLA against the frozen VLA's full-forward action distribution (full) "
                                            "or the demonstrated actions (demo, the paper's)."),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(1e-3),
    ratio_weight: float = typer.Option(0.1, help="lambda of L_ratio = -sum_j p_j r_j (higher: more reuse)."),
    mask_temperature: float = typer.Option(0.25, help="tau_s of the token mask's sigmoid."),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 where native), no or bf16: the frozen VLA's forward."),
    max_minutes: float = typer.Option(0.0, help="Stop and checkpoint after this wall time (0: no limit)."),
    val_every: int = typer.Option(250),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    resume: bool = typer.Option(False, help="Continue from OUT/training_state.pt."),
    stop_at_step: int = typer.Option(0, help="Stop and checkpoint after this many steps (0: train to the end)."),
    progress: bool = typer.Option(True),
):
    """LAC's token selector and cache-ratio predictor, trained on a frozen VLA (arXiv 2602.00686)."""
    from kvla.methods.lac import MOTIONS
    from kvla.testbed.train_lac import LACTrainConfig, train_lac

    for path, hint in ((data, "--data"), (checkpoint, "--checkpoint")):
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=hint)
    if target not in ("demo", "full"):
        raise typer.BadParameter("choose demo or full", param_hint="--target")
    if motion not in MOTIONS:
        raise typer.BadParameter(f"choose one of {', '.join(MOTIONS)}", param_hint="--motion")
    if mixed_precision not in ("auto", "no", "bf16"):
        raise typer.BadParameter("choose auto, no or bf16", param_hint="--mixed-precision")
    if threads:
        torch.set_num_threads(threads)
    cfg = LACTrainConfig(checkpoint=str(checkpoint), data=str(data), out=str(out), motion=motion,
                         episodes_per_task=episodes_per_task, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
                         explore_steps=explore_steps, target=target,
                         batch_size=batch_size, lr=lr, ratio_weight=ratio_weight, mask_temperature=mask_temperature,
                         mixed_precision=mixed_precision, max_minutes=max_minutes, val_every=val_every, seed=seed)
    metrics = train_lac(cfg, resume=resume, progress=progress, stop_at_step=stop_at_step)
    console.print(f"final: {json.dumps(metrics)}")


@train_app.command("history")
def train_history_command(
    data: str = typer.Option("data/mt10_wrist.hdf5,data/memory_wrist.hdf5",
                             help="Comma-separated demonstration files (MT10 and the memory variants)."),
    out: Path = typer.Option(Path("runs/history"), help="Output: checkpoint/, best/, log.jsonl, training state."),
    init_from: Path = typer.Option(Path("checkpoints/reference-vla-v2"), help="Single-frame reference VLA to start from."),
    frame_stride: int = typer.Option(4, help="Env steps between two history frames (actions executed per call)."),
    max_frames: int = typer.Option(50, help="Frames of the longest training sequence."),
    window_probability: float = typer.Option(0.3, help="Share of episodes trained with a truncated history."),
    max_window: int = typer.Option(8, help="Truncated histories keep 0..this many earlier frames."),
    episodes_per_step: int = typer.Option(2),
    lr: float = typer.Option(1e-4),
    max_steps: int = typer.Option(3000),
    max_minutes: float = typer.Option(0.0, help="Stop and checkpoint after this wall time (0: no limit)."),
    val_every: int = typer.Option(250),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 where native), no or bf16."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    resume: bool = typer.Option(False, help="Continue from OUT/training_state.pt."),
    progress: bool = typer.Option(True),
):
    """The history VLA: whole demonstration episodes as one causal sequence (teacher forcing over time)."""
    from kvla.testbed.train_history import HistoryTrainConfig, train_history

    paths = tuple(p.strip() for p in data.split(",") if p.strip())
    for path in paths:
        if not Path(path).exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint="--data")
    if not (init_from / "config.json").exists():
        raise typer.BadParameter(f"{init_from} is not a checkpoint directory", param_hint="--init-from")
    if threads:
        torch.set_num_threads(threads)
    cfg = HistoryTrainConfig(data=paths, out=str(out), init_from=str(init_from), frame_stride=frame_stride,
                             max_frames=max_frames, window_probability=window_probability, max_window=max_window,
                             episodes_per_step=episodes_per_step, lr=lr, max_steps=max_steps, max_minutes=max_minutes,
                             val_every=val_every, mixed_precision=mixed_precision, seed=seed)
    metrics = train_history(cfg, resume=resume, progress=progress)
    console.print(f"final: {json.dumps(metrics)}")


@train_app.command("kv-efficient")
def train_kv_efficient_command(
    checkpoint: Path = typer.Option(Path("checkpoints/history-vla-v1"), help="The history VLA (kept frozen)."),
    data: str = typer.Option("data/mt10_wrist.hdf5,data/memory_wrist.hdf5", help="Comma-separated demonstration files."),
    out: Path = typer.Option(Path("runs/kv-efficient"), help="Output: checkpoint/, best/ (gate, LoRA), log.jsonl."),
    method: str = typer.Option("kv_efficient", help="The method's settings: kv_efficient:chunk_frames=2:recent_frames=4..."),
    summary_width: int = typer.Option(64),
    gate_width: int = typer.Option(128, help="LSTM width (the authors' proof of concept: 128)."),
    lora_rank: int = typer.Option(8, help="LoRA rank of the decoder's q/v compensation (0: none)."),
    memory_weight: float = typer.Option(0.05, help="lambda of the memory penalty (mean utility of the decided chunks)."),
    initial_keep: float = typer.Option(0.9, help="The gate's utility at the start (its head's bias), in (0, 1)."),
    temperature: float = typer.Option(0.5, help="Binary-concrete temperature of the keep relaxation."),
    episodes_per_task: int = typer.Option(40, help="Training episodes per task."),
    lr: float = typer.Option(5e-4),
    max_steps: int = typer.Option(600),
    max_minutes: float = typer.Option(0.0, help="Stop and checkpoint after this wall time (0: no limit)."),
    val_every: int = typer.Option(100),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 where native), no or bf16."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
    resume: bool = typer.Option(False, help="Continue from OUT/training_state.pt."),
    progress: bool = typer.Option(True),
):
    """kv_efficient's chunk gate and LoRA compensation on a frozen history VLA (arXiv 2509.21354)."""
    from kvla.model.history import is_history_checkpoint
    from kvla.testbed.train_kv_efficient import KVEfficientTrainConfig, train_kv_efficient

    paths = tuple(p.strip() for p in data.split(",") if p.strip())
    for path in paths:
        if not Path(path).exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint="--data")
    if not is_history_checkpoint(checkpoint):
        raise typer.BadParameter(f"{checkpoint} is not a history VLA checkpoint (kvla train history)",
                                 param_hint="--checkpoint")
    try:
        parse_method(method)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--method") from None
    if threads:
        torch.set_num_threads(threads)
    cfg = KVEfficientTrainConfig(data=paths, out=str(out), checkpoint=str(checkpoint), method=method,
                                 summary_width=summary_width, gate_width=gate_width, lora_rank=lora_rank,
                                 memory_weight=memory_weight, initial_keep=initial_keep, temperature=temperature,
                                 episodes_per_task=episodes_per_task, lr=lr, max_steps=max_steps,
                                 max_minutes=max_minutes, val_every=val_every, mixed_precision=mixed_precision,
                                 seed=seed)
    metrics = train_kv_efficient(cfg, resume=resume, progress=progress)
    console.print(f"final: {json.dumps(metrics)}")


@app.command("serve")
def serve_command(
    checkpoint: Path = typer.Option(Path("checkpoints/reference-vla-v2"), help="A trained reference or history VLA."),
    method: str = typer.Option("full", help="The method and its settings (name:key=value)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000),
    api_key_file: Path = typer.Option(None, help="A file holding the API key clients must send "
                                                "(Authorization: Api-Key <key>)."),
    max_sessions: int = typer.Option(64, help="Robots connected at once; more are refused with 503."),
    idle_timeout: float = typer.Option(300.0, help="Seconds without a request before a robot is disconnected."),
    max_message_mib: float = typer.Option(16.0, help="Largest message accepted."),
    max_image_side: int = typer.Option(1024, help="Largest camera frame side accepted."),
    max_batch: int = typer.Option(32, help="Requests of different robots stepped together (1: one at a time)."),
    max_wait_ms: float = typer.Option(2.0, help="How long a step waits for more robots' requests to join it."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds to finish the steps in flight before "
                                                      "answering them with an error."),
    device: str = typer.Option("cpu", help="Where the model runs: cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave as is)."),
):
    """A policy server in openpi's protocol: robot code using openpi-client talks to it unchanged."""
    import logging

    from kvla.serve.server import ServeSettings, build_server, run_until_signalled

    if not (checkpoint / "config.json").exists():
        raise typer.BadParameter(f"{checkpoint} is not a checkpoint directory (no config.json)", param_hint="--checkpoint")
    try:
        parse_method(method)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--method") from None
    api_key = None
    if api_key_file is not None:
        if not api_key_file.is_file():
            raise typer.BadParameter(f"{api_key_file} is not a file", param_hint="--api-key-file")
        api_key = api_key_file.read_text().strip()
        if not api_key:
            raise typer.BadParameter(f"{api_key_file} is empty", param_hint="--api-key-file")
    if threads:
        torch.set_num_threads(threads)
    settings = ServeSettings(host=host, port=port, api_key=api_key, max_sessions=max_sessions,
                             idle_timeout_s=idle_timeout, max_message_bytes=int(max_message_mib * (1 << 20)),
                             max_batch=max_batch, max_wait_ms=max_wait_ms, shutdown_timeout_s=shutdown_timeout)
    if max_batch < 1 or max_wait_ms < 0:
        raise typer.BadParameter("--max-batch must be >= 1 and --max-wait-ms >= 0", param_hint="--max-batch")
    try:
        server = build_server(checkpoint, method, settings, max_image_side=max_image_side, device=device, dtype=dtype)
    except ValueError as error:
        hint = "--dtype" if "dtype" in str(error) else "--device" if "device" in str(error) else "--method"
        raise typer.BadParameter(str(error), param_hint=hint) from None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_until_signalled(server)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(Path("checkpoints/reference-vla"), help="A trained reference VLA."),
    methods: str = typer.Option("full,vla_cache", help="Comma-separated methods (settings as name:key=value)."),
    tasks: str = typer.Option("mt10", help="Comma-separated task names or sets: mt10, memory (goal hidden after "
                                                 "the first steps), all."),
    episodes: int = typer.Option(20, help="Held-out episodes per task (seeds from --seed-start)."),
    seed_start: int = typer.Option(10_000, help="First evaluation seed (demonstrations use seeds from 0)."),
    max_steps: int = typer.Option(200, help="Episode length limit (the demonstrations were collected within 200 steps)."),
    workers: int = typer.Option(2, help="Worker processes (with --ray-address local: Ray's CPUs)."),
    ray_address: str = typer.Option(None, help="Run the episodes as Ray tasks: 'local' (a Ray instance here), "
                                              "'auto' or a cluster address; nodes need kvla and the checkpoint path."),
    json_path: Path = typer.Option(None, "--json", help="Write one record per method (overall) and per task."),
    episodes_json: Path = typer.Option(None, "--episodes-json", help="Write one record per episode and method."),
    plot: Path = typer.Option(None, help="PNG: success against speed-up per method."),
    video: Path = typer.Option(None, help="GIF of one episode per method with the reused patches shaded (suffix added)."),
    fidelity: bool = typer.Option(False, help="Teacher-forced proxy on held-out demonstrations instead of closed loop."),
    data: Path = typer.Option(Path("data/metaworld_mt10.hdf5"), help="Demonstrations, for --fidelity."),
    fidelity_episodes: int = typer.Option(2, help="Held-out demonstration episodes per task for --fidelity."),
    perturb: str = typer.Option("none", help="--fidelity: a photometric perturbation of the frames (none, flicker, "
                                             "exposure_ramp, colour_shift, shadow)."),
    progress: bool = typer.Option(True),
):
    """Closed-loop success, paired across methods by seed; or --fidelity on demonstration frames."""
    from kvla.testbed import evaluate
    from kvla.testbed.sim import parse_tasks

    from kvla.guard import parse_guarded

    specs = [s for s in methods.split(",") if s.strip()]
    try:
        parsed = {spec: parse_guarded(spec) for spec in specs}
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--methods") from None
    history = evaluate.reference_method(checkpoint) == "history_full"
    wrong = [spec for spec, (method, _) in parsed.items() if (getattr(method, "kind", "") == "history") != history]
    if history and any(guard is not None for _, guard in parsed.values()):
        raise typer.BadParameter("the fidelity guard runs on single-frame VLAs; a history VLA takes none",
                                 param_hint="--methods")
    if wrong:
        kind = "a history VLA: it takes history methods" if history else "a single-frame VLA: it takes reuse methods"
        raise typer.BadParameter(f"{checkpoint} is {kind}, not {', '.join(wrong)}", param_hint="--methods")
    specs = list(dict.fromkeys([evaluate.reference_method(checkpoint), *specs]))
    try:
        task_list = parse_tasks(tasks)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tasks") from None
    if not (checkpoint / "config.json").exists():
        raise typer.BadParameter(f"{checkpoint} is not a checkpoint directory (no config.json)", param_hint="--checkpoint")

    if fidelity:
        from kvla.testbed.sim import perturbation

        try:
            perturbation(perturb)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--perturb") from None
        _eval_fidelity(checkpoint, specs, task_list, data, fidelity_episodes, json_path, progress, perturb)
        return
    if ray_address is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise typer.BadParameter("Ray is not installed: pip install 'kvla[ray]'", param_hint="--ray-address") from None
    results = evaluate.run_closed_loop(str(checkpoint), specs, task_list, episodes, seed_start=seed_start,
                                       max_steps=max_steps, workers=workers, progress=progress, ray_address=ray_address)
    labels = [o.method for o in results[0]]
    summaries = evaluate.summarise(results, labels)
    table = Table(title=f"kvla eval - {checkpoint}, {episodes} held-out episodes per task (seeds {seed_start}..), "
                        f"paired across methods")
    for column in ("task", "method", "success", "95 % CI", "vs full", "95 % CI (paired)", "step ms", "speed-up",
                   "reuse", "MFLOPs/step", "KV MiB"):
        table.add_column(column, justify="left" if column in ("task", "method") else "right")
    for s in summaries:
        table.add_row(s.task, s.method, f"{s.success_rate:.1%}", f"{s.success_ci[0]:.0%}-{s.success_ci[1]:.0%}",
                      f"{s.delta_vs_full:+.1%}", f"{s.delta_ci[0]:+.1%}..{s.delta_ci[1]:+.1%}", f"{s.step_ms:.1f}",
                      f"{s.speedup_step:.2f}x", f"{s.reuse_ratio:.1%}", f"{s.flops / 1e6:.0f}",
                      f"{s.kv_bytes / 2**20:.2f}")
    console.print(table)
    parts = Table(title="policy step by part, all tasks: medians over every step (ms)")
    for column in ("method", "vision", "select", "prefill", "decode", "step", "prefill share"):
        parts.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        if s.task == "all":
            parts.add_row(s.method, f"{s.vision_ms:.1f}", f"{s.select_ms:.2f}", f"{s.prefill_ms:.1f}",
                          f"{s.decode_ms:.1f}", f"{s.step_ms:.1f}", f"{s.prefill_ms / s.step_ms:.0%}")
    console.print(parts)
    if json_path:
        from kvla.guard import guard_settings
        from kvla.measure.receipt import checkpoint_digest, make_receipt, write_receipt

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(evaluate.summaries_as_json(summaries), indent=2))
        receipt = make_receipt(
            "kvla eval", model={"checkpoint": str(checkpoint), "sha256": checkpoint_digest(checkpoint)},
            methods=[parse_guarded(s)[0] for s in specs], device="cpu", dtype=torch.float32, agreement=None,
            agreement_note="closed loop: each method acts on its own trajectory, so its actions are not compared "
                           "with full's; kvla eval --fidelity measures agreement on shared frames",
            extra={"tasks": task_list, "episodes_per_task": episodes, "seed_start": seed_start, "max_steps": max_steps,
                   "guards": guard_settings(specs)})
        console.print(f"wrote {json_path} and {write_receipt(json_path, receipt)}")
    if episodes_json:
        episodes_json.parent.mkdir(parents=True, exist_ok=True)
        episodes_json.write_text(json.dumps(evaluate.episodes_as_json(results), indent=1))
        console.print(f"wrote {episodes_json}")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        evaluate.plot_success_vs_speedup(summaries, plot)
        console.print(f"wrote {plot}")
    if video:
        _eval_videos(checkpoint, specs, task_list[0], seed_start, max_steps, video)


def _eval_videos(checkpoint, specs, task, seed, max_steps, video: Path):
    from kvla.testbed import evaluate
    from kvla.policy import CachedVLAPolicy
    from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
    from kvla.testbed.sim import ALL_TASKS

    model, tokenizer = load_policy_checkpoint(checkpoint)
    cameras = checkpoint_cameras(checkpoint)
    video.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        policy = evaluate.make_policies(checkpoint, model, [spec])[0]
        outcome, frames = evaluate.run_episode(policy, tokenizer.encode_batch([ALL_TASKS[task]]), task, seed,
                                               model.config.image_size, max_steps, record=True, cameras=cameras)
        # the whole spec goes into the name: two settings of one method must not overwrite each other
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        path = video.with_name(f"{video.stem}-{name}{video.suffix or '.gif'}")
        evaluate.save_video(frames, path)
        console.print(f"wrote {path} ({task}, seed {seed}, success {outcome.success}, {outcome.steps} steps)")


def _eval_fidelity(checkpoint, specs, task_list, data: Path, episodes_per_task: int, json_path, progress,
                   perturb: str = "none"):
    from dataclasses import asdict

    from kvla.testbed import evaluate
    from kvla.testbed.data import demo_index, load_demos
    from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
    from kvla.testbed.train import split_demos

    from kvla.model.history import is_history_checkpoint

    if is_history_checkpoint(checkpoint):
        raise typer.BadParameter(f"{checkpoint} is a history VLA: --fidelity compares single-frame methods; "
                                 "`kvla train kv-efficient` logs a history method's agreement with history_full",
                                 param_hint="--fidelity")
    if not data.exists():
        raise typer.BadParameter(f"{data} does not exist", param_hint="--data")
    model, tokenizer = load_policy_checkpoint(checkpoint)
    cameras = checkpoint_cameras(checkpoint)
    # the training run's own held-out episodes (its config is saved beside or inside the checkpoint)
    train_cfgs = [p for p in (checkpoint / "train_config.json", checkpoint.parent / "train_config.json") if p.exists()]
    held_out_per_task = json.loads(train_cfgs[0].read_text())["val_episodes_per_task"] if train_cfgs else 4
    _, held_out = split_demos([d for d in demo_index(data) if d.task in task_list], held_out_per_task)
    chosen: dict[str, list] = {}
    for info in held_out:
        if len(chosen.setdefault(info.task, [])) < episodes_per_task:
            chosen[info.task].append(info.name)
    demos = load_demos(data, cameras, [name for names in chosen.values() for name in names])  # only these frames
    from kvla.guard import guard_settings, parse_guarded
    from kvla.testbed.sim import perturbation

    records = evaluate.run_fidelity(model, tokenizer, demos, specs, progress=progress, perturbation=perturbation(perturb))
    table = Table(title=f"kvla eval --fidelity - {len(demos)} held-out demonstrations, teacher-forced, "
                        f"perturbation {perturb}")
    for column in ("method", "frames", "token agreement with full", "L1 vs full", "L1 vs demo", "reuse"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in records:
        table.add_row(r.method, str(r.frames), f"{r.token_agreement:.1%}", f"{r.l1_vs_full:.4f}",
                      f"{r.l1_vs_demo:.4f}", f"{r.reuse_ratio:.1%}")
    console.print(table)
    if json_path:
        from kvla.measure.receipt import checkpoint_digest, make_receipt, write_receipt

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in records], indent=2))
        receipt = make_receipt(
            "kvla eval --fidelity", model={"checkpoint": str(checkpoint), "sha256": checkpoint_digest(checkpoint)},
            methods=[parse_guarded(s)[0] for s in specs], device="cpu", dtype=torch.float32,
            agreement={r.method: {"token_agreement": r.token_agreement, "l1_vs_full": r.l1_vs_full} for r in records},
            extra={"guards": guard_settings(specs),
                   "demonstrations": [name for names in chosen.values() for name in names],
                   "data": str(data), "perturbation": perturb})
        console.print(f"wrote {json_path} and {write_receipt(json_path, receipt)}")
