import json

import pytest
from typer.testing import CliRunner

from kvla.cli import app

FIELDS = {"method", "step_ms", "prefill_ms", "speedup_step", "speedup_prefill", "reuse_ratio", "flops",
          "kv_bytes", "select_ms"}


def test_bench_latency_on_the_bundled_frames(tmp_path):
    out = tmp_path / "latency.json"
    result = CliRunner().invoke(app, ["bench", "latency", "--preset", "tiny", "--steps", "5", "--no-progress",
                                      "--methods", "full,static,vla_cache:top_k=12:schedule=none", "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"full", "static", "vla_cache:top_k=12:schedule=none"}
    for record in records.values():
        assert FIELDS <= set(record)
        assert record["step_ms"] > 0 and record["steps"] == 4
        assert abs(sum(record["flops_by_part"].values()) - record["flops"]) <= 1e-9 * record["flops"]
    assert records["full"]["speedup_step"] == 1.0 and records["full"]["reuse_ratio"] == 0.0
    assert records["static"]["reuse_ratio"] > 0.5  # the bundled episode is mostly static
    assert records["static"]["flops"] < records["full"]["flops"]
    assert 0 < records["vla_cache:top_k=12:schedule=none"]["reuse_ratio"] <= 12 / 16
    assert "speed-up" in result.output


def test_bench_latency_rejects_unknown_method_and_dtype():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "latency", "--preset", "tiny", "--methods", "full,magic", "--no-progress"])
    assert bad.exit_code != 0 and "unknown method 'magic'" in bad.output
    bad = runner.invoke(app, ["bench", "latency", "--preset", "tiny", "--dtype", "float8"])
    assert bad.exit_code != 0 and "dtype must be one of" in bad.output


@pytest.mark.parametrize("model", ["smolvlm:tiny", "paligemma:tiny"])
def test_bench_latency_runs_a_vlm_host(tmp_path, model):
    out = tmp_path / "host.json"
    result = CliRunner().invoke(app, ["bench", "latency", "--model", model, "--steps", "4", "--no-progress",
                                      "--methods", "full,static", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"model {model}" in " ".join(result.output.split())
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert records["static"]["reuse_ratio"] > 0.5 and records["static"]["flops"] < records["full"]["flops"]
    assert records["full"]["flops_by_part"]["vision"] > 0
    bad = CliRunner().invoke(app, ["bench", "latency", "--model", "gpt:7b"])
    assert bad.exit_code != 0 and "unknown host model 'gpt:7b'" in bad.output


def test_eval_refuses_methods_of_the_other_kind(tmp_path):
    from conftest import make_history_checkpoint

    def said(result):  # the error box wraps its lines
        return " ".join(result.output.replace("│", " ").split())

    runner = CliRunner()
    single = runner.invoke(app, ["eval", "--checkpoint", "checkpoints/reference-vla-v2", "--methods", "history_full",
                                 "--episodes", "1", "--no-progress"])
    assert single.exit_code != 0 and "single-frame VLA" in said(single)
    make_history_checkpoint(tmp_path)
    history = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path), "--methods", "vla_cache", "--episodes", "1",
                                  "--no-progress"])
    assert history.exit_code != 0 and "history VLA" in said(history)
    tasks = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path), "--methods", "no_history", "--tasks", "reach-v9",
                                "--no-progress"])
    assert tasks.exit_code != 0 and "unknown task" in said(tasks)
