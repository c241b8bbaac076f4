"""The `kvla` command line."""

from __future__ import annotations

import dataclasses
import json
import platform
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
    from kvla.bench import records_as_json, run_latency
    from kvla.frames import load_frames
    from kvla.model import PRESETS, VLAModel

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(_DTYPES)}", param_hint="--dtype")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    specs = [s for s in methods.split(",") if s.strip()]
    try:
        for spec in specs:
            parse_method(spec)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if threads:
        torch.set_num_threads(threads)
    episode = load_frames(frames)
    model = VLAModel.from_preset(preset, seed=seed).to(device=device, dtype=_DTYPES[dtype])
    records = run_latency(model, specs, episode, steps=steps or None, text_seed=seed, progress=progress)
    machine = torch.cuda.get_device_name() if device == "cuda" else _machine()
    table = Table(title=f"kvla bench latency - preset {preset}, {dtype}, {machine}, {records[0].steps} steps of {episode.source}")
    for column in ("method", "step ms", "prefill ms", "speed-up step", "speed-up prefill", "reuse", "GFLOPs",
                   "KV MB", "select ms", "select % step"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in records:
        table.add_row(r.method, f"{r.step_ms:.1f}", f"{r.prefill_ms:.1f}", f"{r.speedup_step:.2f}x",
                      f"{r.speedup_prefill:.2f}x", f"{r.reuse_ratio:.1%}", f"{r.flops / 1e9:.1f}",
                      f"{r.kv_bytes / 2**20:.1f}", f"{r.select_ms:.2f}", f"{r.select_ms / r.step_ms:.1%}")
    console.print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(records_as_json(records), indent=2))
        console.print(f"wrote {json_path}")


@bench_app.command("flops")
def bench_flops(
    preset: str = typer.Option("openvla-7b", help="Model preset."),
    prompt_tokens: int = typer.Option(285, help="Prompt length N (OpenVLA on LIBERO: BOS + 256 visual + ~28 text)."),
    json_path: Path = typer.Option(None, "--json", help="Write prefill_flops and prefill_macs here."),
):
    """Decoder-prefill FLOPs of the preset's language model for an N-token prompt (no head)."""
    from kvla.flops import plain_prefill_macs
    from kvla.model import preset_config

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
    from kvla.model import PRESETS

    for name, cfg in PRESETS.items():
        console.print(f"[bold]{name}[/bold]: {cfg.family} decoder {cfg.num_layers}x{cfg.hidden_size}, "
                      f"{cfg.num_visual} visual tokens ({cfg.image_size}px / {cfg.patch_size}px patches), "
                      f"prompt {cfg.layout().seq_len} tokens")


def main():  # pragma: no cover
    app()
