"""The real `openpi-client` (0.1.2, in its own venv: it pins numpy < 2) drives a closed-loop
MetaWorld episode through kvla's server, and gets the in-process policy's actions."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvla.model.reference import load_policy_checkpoint
from kvla.policy import CachedVLAPolicy
from kvla.serve.server import BackgroundServer, ServeSettings, build_server


ROOT = Path(__file__).resolve().parents[1]
OPENPI_PYTHON = ROOT / ".venv-openpi" / "bin" / "python"
CHECKPOINT = ROOT / "checkpoints" / "reference-vla-v2"

pytestmark = pytest.mark.skipif(not OPENPI_PYTHON.exists(),
                                reason="openpi-client's venv is missing: `make .venv-openpi/.installed` (make test builds it)")


def _client(port, out, *extra, check=True):
    command = [str(OPENPI_PYTHON), str(ROOT / "scripts" / "openpi_client_episode.py"), "--port", str(port),
               "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=check)


def test_the_real_openpi_client_runs_an_episode_and_gets_the_in_process_actions(tmp_path):
    server = BackgroundServer(build_server(CHECKPOINT, "vla_cache", ServeSettings(port=0, api_key="robot-key")))
    try:
        refused = _client(server.server.port, tmp_path / "refused.npz", "--max-steps", "8", check=False)
        assert refused.returncode != 0 and "401" in refused.stderr  # no key: refused at the handshake
        done = _client(server.server.port, tmp_path / "episode.npz", "--api-key", "robot-key", "--task", "push-v3",
                       "--max-steps", "48")
        assert "policy calls through kvla serve (vla_cache)" in done.stdout
    finally:
        server.stop()
    episode = np.load(tmp_path / "episode.npz")
    model, tokenizer = load_policy_checkpoint(CHECKPOINT)
    policy = CachedVLAPolicy(model, "vla_cache")
    text_ids = tokenizer.encode_batch([str(episode["prompt"])])
    assert len(episode["images"]) == 12  # 48 env steps, a chunk of 4 per call
    for images, proprio, served in zip(episode["images"], episode["proprio"], episode["action_tokens"]):
        out = policy.step(torch.from_numpy(images)[None], text_ids, torch.from_numpy(proprio)[None])
        np.testing.assert_array_equal(served, out.action_tokens[0].numpy())
    assert policy.state.step == 12
