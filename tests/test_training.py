"""Training the reference VLA v2 shape: camera stacks, resumable accelerate loop, checkpoints that
name their cameras, and a two-camera closed loop in the real simulator."""

import json

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from kvla.model.reference import InstructionTokenizer, checkpoint_cameras, load_policy_checkpoint, reference_config
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.testbed.data import CAMERA_KEYS, demo_cameras, load_demos
from kvla.testbed.sim import CAMERA, TASKS, WRIST_CAMERA
from kvla.testbed.train import DemoFrames, TrainConfig, action_logits, random_shift, train_policy

TINY = dict(image_size=32, patch_size=8, vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4)


def _write_demo_file(path, cameras, episodes_per_task=3, length=7, size=32, tasks=("reach-v3", "push-v3")):
    """A demonstration file in kvla's HDF5 layout with random frames (no simulator needed)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for task in tasks:
            for seed in range(episodes_per_task):
                g = data.create_group(f"demo_{len(data)}")
                g.attrs.update(num_samples=length, task=task, instruction=TASKS[task], seed=seed, success=True)
                for camera in cameras:
                    g.create_dataset(f"obs/{CAMERA_KEYS[camera]}",
                                     data=rng.integers(0, 255, (length, size, size, 3), dtype=np.uint8))
                g.create_dataset("obs/proprio", data=rng.standard_normal((length, 4)).astype(np.float32))
                g.create_dataset("actions", data=rng.uniform(-1, 1, (length, 4)).astype(np.float32))
        f.attrs["cameras"] = list(cameras)
        f.attrs["image_size"] = size


def test_demo_file_cameras_are_stacked_in_order(tmp_path):
    path = tmp_path / "demos.hdf5"
    _write_demo_file(path, (CAMERA, WRIST_CAMERA))
    assert demo_cameras(path) == (CAMERA, WRIST_CAMERA)
    both, wrist_only = load_demos(path), load_demos(path, (WRIST_CAMERA,))
    assert both[0].images.shape == (7, 2, 32, 32, 3)
    assert np.array_equal(both[0].images[:, 1], wrist_only[0].images[:, 0])
    with pytest.raises(ValueError, match="no frames from camera"):
        load_demos(path, ("topview",))


def test_random_shift_moves_each_camera_on_its_own():
    images = torch.arange(2 * 2 * 8 * 8 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 2, 8, 8, 3)
    generator = torch.Generator().manual_seed(3)
    shifted = random_shift(images, 2, generator)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, images)
    # replicate padding: every shifted pixel comes from its own image
    for b in range(2):
        for c in range(2):
            assert set(map(tuple, shifted[b, c].reshape(-1, 3).tolist())) <= set(map(tuple, images[b, c].reshape(-1, 3).tolist()))


def test_two_camera_training_logits_equal_the_inference_path():
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2,
                                      **TINY)).eval()
    assert model.layout.num_visual == 2 * 16 and len(model.layout.visual_spans) == 2
    images = torch.randint(0, 255, (3, 2, 32, 32, 3), dtype=torch.uint8)
    proprio, text_ids = torch.randn(3, 4), tokenizer.encode_batch([TASKS["reach-v3"]] * 3)
    targets = model.actions_to_tokens(torch.rand(3, 8) * 2 - 1)
    with torch.no_grad():
        logits = action_logits(model, images, proprio, text_ids, targets)
    out = CachedVLAPolicy(model, "full").step(images, text_ids, proprio)
    assert (out.logits - logits).abs().max() < 1e-4
    # each camera's tokens come from its own image: changing the wrist image changes only its tokens' input
    other = images.clone()
    other[:, 1] = 0
    visual, visual_other = model.encode_images(images), model.encode_images(other)
    assert torch.equal(visual[:, :16], visual_other[:, :16]) and not torch.equal(visual[:, 16:], visual_other[:, 16:])


def test_demo_frames_preallocated_fill_matches_the_demos(tmp_path):
    path = tmp_path / "demos.hdf5"
    _write_demo_file(path, (CAMERA, WRIST_CAMERA))
    demos = load_demos(path)
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    frames = DemoFrames(iter(demos), tokenizer, action_chunk=2, total_frames=sum(len(d.actions) for d in demos))
    assert frames.images.shape == (len(demos) * 7, 2, 32, 32, 3)
    assert torch.equal(frames.images[7:14], torch.as_tensor(demos[1].images))
    with pytest.raises(ValueError, match="frames"):
        DemoFrames(iter(demos), tokenizer, action_chunk=2, total_frames=10)


def test_training_resumes_where_it_stopped_and_saves_its_cameras(tmp_path):
    data = tmp_path / "demos.hdf5"
    _write_demo_file(data, (CAMERA, WRIST_CAMERA))
    import kvla.testbed.train as train_module

    config = dict(data=str(data), layers=2, batch_size=4, warmup_steps=2, val_every=3, log_every=1,
                  val_episodes_per_task=1, mixed_precision="bf16")
    original = train_module.reference_config
    train_module.reference_config = lambda tokenizer, **kw: original(tokenizer, **{**kw, **TINY})
    try:
        # one run of 6 steps, and one stopped after 3 and resumed to 6: the same weights
        straight = train_policy(TrainConfig(out=str(tmp_path / "a"), max_steps=6, **config), progress=False)
        train_policy(TrainConfig(out=str(tmp_path / "b"), max_steps=6, max_minutes=1e-9, **config), progress=False)
        first_log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
        assert first_log[-1]["step"] == 1  # stopped by the time limit, checkpointed
        resumed = train_policy(TrainConfig(out=str(tmp_path / "b"), max_steps=6, **config), resume=True, progress=False)
    finally:
        train_module.reference_config = original
    assert straight["step"] == resumed["step"] == 6
    a, _ = load_policy_checkpoint(tmp_path / "a" / "checkpoint")
    b, _ = load_policy_checkpoint(tmp_path / "b" / "checkpoint")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa, pb, atol=1e-5), name
    assert checkpoint_cameras(tmp_path / "a" / "checkpoint") == (CAMERA, WRIST_CAMERA)
    assert a.config.num_cameras == 2 and a.config.parallel_actions and a.config.action_chunk == 4
    assert checkpoint_cameras(tmp_path) == (CAMERA,)  # a checkpoint from before sim.json: corner2


def test_two_camera_closed_loop_in_the_simulator(tmp_path):
    pytest.importorskip("metaworld")
    from kvla.model.vla import VLAConfig
    from kvla.testbed.evaluate import run_closed_loop
    from kvla.testbed.train import save_observation_spec

    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2,
                                      **{**TINY, "image_size": 64, "patch_size": 16})).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    save_observation_spec(tmp_path, (CAMERA, WRIST_CAMERA), 64)
    results = run_closed_loop(str(tmp_path), ["full", "vla_cache:schedule=none"], ["reach-v3"], 1,
                              max_steps=6, workers=1, progress=False)
    full, cached = results[0]
    assert full.steps == cached.steps == 6 and len(full.step_ms) == 3  # chunks of 2 executed open loop
    assert full.reuse == [0.0] * 3 and max(cached.reuse[1:]) > 0  # the static background is reused
    assert isinstance(VLAConfig(**json.loads((tmp_path / "config.json").read_text())), VLAConfig)


def test_eval_cli_reports_the_step_by_part(tmp_path):
    pytest.importorskip("metaworld")
    from typer.testing import CliRunner

    from kvla.cli import app
    from kvla.testbed.train import save_observation_spec

    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2,
                                      **{**TINY, "image_size": 64, "patch_size": 16})).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    save_observation_spec(tmp_path / "ckpt", (CAMERA, WRIST_CAMERA), 64)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--methods", "full,static",
                                      "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "4", "--workers", "1",
                                      "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "prefill share" in result.output
    rows = {(r["task"], r["method"]): r for r in json.loads(out.read_text())}
    full = rows[("all", "full")]
    parts = [full[f"{p}_ms"] for p in ("vision", "select", "prefill", "decode")]
    assert all(p >= 0 for p in parts) and full["prefill_ms"] > 0
    assert sum(parts) <= full["step_ms"] * 1.5  # medians of parts, roughly the median step
    receipt = json.loads((tmp_path / "eval.receipt.json").read_text())  # what produced these numbers
    assert receipt["command"] == "kvla eval" and receipt["model"]["checkpoint"] == str(tmp_path / "ckpt")
    assert len(receipt["model"]["sha256"]) == 64 and [m["name"] for m in receipt["methods"]] == ["full", "static"]
    assert receipt["agreement_with_full"] is None and "--fidelity" in receipt["agreement_note"]


def test_fidelity_acts_on_the_frames_the_closed_loop_would(tmp_path):
    from kvla.testbed.evaluate import run_fidelity

    path = tmp_path / "demos.hdf5"
    _write_demo_file(path, (CAMERA, WRIST_CAMERA), episodes_per_task=1, length=5, tasks=("reach-v3",))
    demo = load_demos(path)[0]
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2,
                                      **TINY)).eval()
    full, static = run_fidelity(model, tokenizer, [demo], ["static:tau=0.0"], progress=False)
    assert full.frames == static.frames == 3  # frames 0, 2, 4 with a chunk of 2
    assert full.token_agreement == 1.0 and full.l1_vs_full == 0.0 and full.reuse_ratio == 0.0
    # full's L1 against the demonstrated chunks, computed independently
    policy = CachedVLAPolicy(model, "full")
    text_ids = tokenizer.encode_batch([demo.instruction])
    errors = []
    for t, steps in ((0, [0, 1]), (2, [2, 3]), (4, [4, 4])):
        out = policy.step(torch.as_tensor(demo.images[t])[None], text_ids, torch.as_tensor(demo.proprio[t])[None])
        target = torch.as_tensor(demo.actions[steps]).clamp(-1, 1).reshape(-1)
        errors.append((out.actions[0] - target).abs().mean())
    assert full.l1_vs_demo == pytest.approx(float(torch.stack(errors).mean()), abs=1e-6)
    assert static.reuse_ratio > 0  # tau 0 reuses every cached token after the first frame


def test_init_from_starts_from_a_checkpoint_and_refuses_another_shape(tmp_path):
    data = tmp_path / "demos.hdf5"
    _write_demo_file(data, (CAMERA, WRIST_CAMERA))
    import kvla.testbed.train as train_module

    config = dict(data=str(data), layers=2, batch_size=4, warmup_steps=2, val_every=100, log_every=1,
                  val_episodes_per_task=1)
    original = train_module.reference_config
    train_module.reference_config = lambda tokenizer, **kw: original(tokenizer, **{**kw, **TINY})
    try:
        train_policy(TrainConfig(out=str(tmp_path / "a"), max_steps=2, **config), progress=False)
        train_policy(TrainConfig(out=str(tmp_path / "b"), max_steps=1, lr=1e-12, init_from=str(tmp_path / "a" / "checkpoint"),
                                 **config), progress=False)
        with pytest.raises(ValueError, match=r"action chunk 4 \(this run: 2\)"):
            train_policy(TrainConfig(out=str(tmp_path / "c"), max_steps=1, action_chunk=2,
                                     init_from=str(tmp_path / "a" / "checkpoint"), **config), progress=False)
        with pytest.raises(ValueError, match=r"cameras \('corner2', 'gripperPOV'\) \(this run: \('gripperPOV', 'corner2'\)\)"):
            train_policy(TrainConfig(out=str(tmp_path / "a"), max_steps=3, cameras=(WRIST_CAMERA, CAMERA), **config),
                         resume=True, progress=False)
        # another precision in the same process: accelerate's per-process state is renewed per run
        train_policy(TrainConfig(out=str(tmp_path / "d"), max_steps=1, **{**config, "mixed_precision": "no"}),
                     progress=False)
        # fine-tuning under another mask mode keeps the weights and saves the new mode; resuming under
        # yet another is refused
        train_policy(TrainConfig(out=str(tmp_path / "e"), max_steps=1, lr=1e-12, mask_mode="bidirectional",
                                 init_from=str(tmp_path / "a" / "checkpoint"), **config), progress=False)
        with pytest.raises(ValueError, match="trained with mask_mode 'bidirectional'.*resume with the same mask mode"):
            train_policy(TrainConfig(out=str(tmp_path / "e"), max_steps=2, **config), resume=True, progress=False)
    finally:
        train_module.reference_config = original
    a, _ = load_policy_checkpoint(tmp_path / "a" / "checkpoint")
    b, _ = load_policy_checkpoint(tmp_path / "b" / "checkpoint")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa, pb, atol=1e-6), name  # a step at lr 1e-12 moves nothing
    e, _ = load_policy_checkpoint(tmp_path / "e" / "checkpoint")
    assert e.config.mask_mode == "bidirectional" and e.layout.mask_mode == "bidirectional"
    assert a.config.mask_mode == "causal"


def test_mixed_precision_settings():
    from kvla.testbed.train import resolve_mixed_precision

    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("auto") in ("no", "bf16")
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("int8")


def test_a_checkpoint_tokenizer_names_the_words_it_does_not_know():
    tokenizer = InstructionTokenizer.from_instructions(["open the drawer"])
    assert tokenizer.unknown_words("Open the box") == ["box"] and tokenizer.unknown_words("open the drawer") == []
