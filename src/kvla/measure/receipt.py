"""A receipt beside every result file: what produced the number, so that it can be traced.

`kvla eval` and `kvla bench latency` write `<results>.receipt.json` next to their `--json`: the
environment (kvla, its git commit, torch, transformers, Python, device, dtype, threads), the
model (a checkpoint's SHA-256 over its files, or a preset and its seed), each method with all its
settings, and each method's measured agreement with `full` where the run measured it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
from pathlib import Path

import torch
import transformers

import kvla


def checkpoint_digest(directory) -> str:
    """SHA-256 over a checkpoint directory's files (names and contents, sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(kvla.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(kvla.__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def environment(device: torch.device | str, dtype: torch.dtype) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"kvla": kvla.__version__, "kvla_commit": _git_commit(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}


def method_settings(methods) -> list[dict]:
    from kvla.methods import method_label

    return [{"label": method_label(m), "name": m.name, "settings": dataclasses.asdict(m)} for m in methods]


def make_receipt(command: str, *, model: dict, methods, device, dtype, agreement: dict | None,
                 agreement_note: str = "", extra: dict | None = None) -> dict:
    """agreement: {method label: {"token_agreement": ..., "l1_vs_full": ...}} or None with a note saying why."""
    return {"command": command, "environment": environment(device, dtype), "model": model,
            "methods": method_settings(methods), "agreement_with_full": agreement,
            **({"agreement_note": agreement_note} if agreement_note else {}), **(extra or {})}


def receipt_path(results: Path) -> Path:
    results = Path(results)
    return results.with_name(results.stem + ".receipt.json")


def write_receipt(results: Path, receipt: dict) -> Path:
    path = receipt_path(results)
    path.write_text(json.dumps(receipt, indent=2, default=str))
    return path
