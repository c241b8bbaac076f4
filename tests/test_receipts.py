"""Receipts name what produced a number: versions, device and dtype, the model (checkpoint hash
or preset and seed), every method setting, and the agreement with full the run measured."""

import dataclasses
import hashlib
import json

import torch
import transformers
from typer.testing import CliRunner

import kvla
from kvla.cli import app
from kvla.methods import parse_method


def _check_environment(receipt, dtype="float32"):
    env = receipt["environment"]
    assert env["kvla"] == kvla.__version__ and env["torch"] == torch.__version__
    assert env["transformers"] == transformers.__version__ and env["dtype"] == dtype and env["device"] == "cpu"


def test_bench_latency_writes_a_receipt(tmp_path):
    out = tmp_path / "bench.json"
    specs = ["static:tau=0.99", "vla_cache:top_k=12:schedule=none"]
    result = CliRunner().invoke(app, ["bench", "latency", "--preset", "tiny", "--steps", "4", "--no-progress",
                                      "--seed", "3", "--methods", ",".join(specs), "--json", str(out)])
    assert result.exit_code == 0, result.output
    receipt = json.loads((tmp_path / "bench.receipt.json").read_text())
    _check_environment(receipt)
    assert receipt["model"]["preset"] == "tiny" and receipt["model"]["seed"] == 3
    expected = [json.loads(json.dumps(dataclasses.asdict(parse_method(s)))) for s in ["full", *specs]]
    assert [m["settings"] for m in receipt["methods"]] == expected
    records = {r["method"]: r for r in json.loads(out.read_text())}
    for label, agreement in receipt["agreement_with_full"].items():
        assert agreement["token_agreement"] == records[label]["token_agreement_with_full"]
        assert agreement["l1_vs_full"] == records[label]["l1_vs_full"]
    assert receipt["agreement_with_full"]["full"] == {"token_agreement": 1.0, "l1_vs_full": 0.0}


def test_eval_fidelity_writes_a_receipt_with_the_checkpoint_hash(tmp_path):
    from test_training import CAMERA, TINY, WRIST_CAMERA, _write_demo_file

    from kvla.model.reference import InstructionTokenizer, reference_config
    from kvla.model.vla import VLAModel
    from kvla.testbed.sim import TASKS
    from kvla.testbed.train import save_observation_spec

    data = tmp_path / "demos.hdf5"
    _write_demo_file(data, (CAMERA, WRIST_CAMERA), episodes_per_task=5, length=5, tasks=("reach-v3",))
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2, **TINY))
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    tokenizer.save(checkpoint)
    save_observation_spec(checkpoint, (CAMERA, WRIST_CAMERA), TINY.get("image_size", 32))
    out = tmp_path / "fidelity.json"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--fidelity", "--data", str(data),
                                      "--tasks", "reach-v3", "--methods", "full,static:change=photometric",
                                      "--fidelity-episodes", "1", "--perturb", "flicker", "--json", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    receipt = json.loads((tmp_path / "fidelity.receipt.json").read_text())
    _check_environment(receipt)
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(checkpoint)).encode())
        digest.update(path.read_bytes())
    assert receipt["model"]["sha256"] == digest.hexdigest()
    assert receipt["perturbation"] == "flicker" and receipt["methods"][1]["settings"]["change"] == "photometric"
    records = {r["method"]: r for r in json.loads(out.read_text())}
    for label, agreement in receipt["agreement_with_full"].items():
        assert agreement["token_agreement"] == records[label]["token_agreement"]


def test_bench_history_writes_a_receipt_with_agreement_against_history_full(tmp_path):
    import pytest

    pytest.importorskip("metaworld")
    from conftest import make_history_checkpoint

    checkpoint, out = tmp_path / "history-vla", tmp_path / "history.json"
    make_history_checkpoint(checkpoint)
    result = CliRunner().invoke(app, ["bench", "history", "--checkpoint", str(checkpoint), "--methods",
                                      "history_window:frames=1,no_history", "--env-steps", "24", "--at-step", "20",
                                      "--repeats", "1", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    receipt = json.loads((tmp_path / "history.receipt.json").read_text())
    _check_environment(receipt)
    digest = receipt["model"]["sha256"]
    assert len(digest) == 64 and digest == __import__("kvla.measure.receipt", fromlist=["x"]).checkpoint_digest(checkpoint)
    assert [m["label"] for m in receipt["methods"]] == ["history_full", "history_window:frames=1", "no_history"]
    curves = {c["method"]: c for c in json.loads(out.read_text())["curves"]}
    assert receipt["agreement_with_full"]["history_full"] == {"token_agreement": 1.0, "l1_vs_full": 0.0}
    for label, agreement in receipt["agreement_with_full"].items():
        assert agreement["token_agreement"] == curves[label]["token_agreement_with_full"]
        assert 0.0 <= agreement["token_agreement"] <= 1.0 and agreement["l1_vs_full"] >= 0.0
