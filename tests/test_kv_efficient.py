"""kv_efficient: its training pass with hard decisions equals its cache path, the hard KV budget,
the pooling, and a resumable training run whose LoRA merges into the policy's model."""

import json

import numpy as np
import pytest
import torch

from kvla.engine.history import POOLED, HistoryError
from kvla.history_policy import HistoryVLAPolicy
from kvla.methods.kv_efficient import KVEfficient, KVEfficientModules, KVEfficientModulesConfig, pooling_matrix
from kvla.model.history import HistoryConfig, HistoryLayout
from kvla.model.vla import VLAModel
from kvla.testbed.train_kv_efficient import compressed_sequence_logits

from conftest import make_history_checkpoint

FRAMES = 11


def _model(seed=0):
    return VLAModel.from_preset("tiny", seed=seed, proprio_dim=4, parallel_actions=True, action_chunk=2,
                                num_cameras=2).float()


def _modules(model, directory, seed=0):
    torch.manual_seed(seed)
    kv_width = 2 * model.config.num_kv_heads * (model.config.hidden_size // model.config.num_heads)
    modules = KVEfficientModules(KVEfficientModulesConfig(kv_width, summary_width=16, gate_width=32))
    modules.save(directory)
    return modules.eval()


def _episode(frames=FRAMES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (frames, 2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return images, torch.randn(frames, 4, generator=generator), torch.randint(4, 200, (1, 6), generator=generator)


def _stepped(policy, images, proprio, text):
    policy.reset()
    return torch.stack([policy.step(images[i:i + 1], text, proprio[i:i + 1]).logits[0] for i in range(len(images))])


def _threshold_between(model, modules, method, images, proprio, text):
    """A keep threshold that keeps some chunks and drops others."""
    from kvla.engine.history import HistoryEngine

    with torch.no_grad():
        _, logits, _ = compressed_sequence_logits(model, HistoryEngine(model.language_model), modules, method, images,
                                                  proprio, text, hard=True)
    utilities = torch.sigmoid(logits).sort().values
    assert len(utilities) >= 3 and utilities[0] < utilities[-1]
    return ((utilities[len(utilities) // 2 - 1] + utilities[len(utilities) // 2]) / 2).item()


@pytest.mark.parametrize("keep", ["all", "none", "some", "all, over budget"])
def test_the_training_pass_with_hard_decisions_equals_the_cache_path(tmp_path, keep):
    model = _model()
    modules = _modules(model, tmp_path)
    images, proprio, text = _episode()
    layout = HistoryLayout.of(model.config)
    # over budget: room for the window and one kept chunk, so the budget drops chunks as they come
    budget = (3 + 2 - 1) * layout.frame_len + pooling_matrix(layout, 2, 2, 2).shape[0] if "budget" in keep else 10**6
    method = KVEfficient(modules=str(tmp_path), chunk_frames=2, recent_frames=3, kv_budget=budget)
    method.keep_threshold = {"all": 0.0, "none": 1.0, "all, over budget": 0.0}.get(keep) if keep != "some" else \
        _threshold_between(model, modules, method, images, proprio, text)
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), method)
    stepped = _stepped(policy, images, proprio, text)
    with torch.no_grad():
        reference, logits, decisions = compressed_sequence_logits(model, policy.engine, modules, method, images,
                                                                  proprio, text, hard=True)
    assert (stepped - reference).abs().max() < 1e-4
    kept_chunks = int(decisions.sum().item())
    assert kept_chunks == {"all": len(decisions), "none": 0}.get(keep, kept_chunks)
    if "budget" in keep:
        held = policy.state.method_memory["kv_efficient"]["utility"]
        assert 0 < len(held) < method.first_full_frame(FRAMES) // 2  # every chunk kept, some dropped by the budget
        assert policy.state.num_entries <= budget
        return
    if keep == "some":
        assert 0 < kept_chunks < len(decisions)
    state, layout = policy.state, policy.layout
    pooled = pooling_matrix(layout, 2, 2, 2).shape[0]
    # after its last step the policy has also decided the chunks that step pushed out of the window
    kept_by_policy = len(state.method_memory["kv_efficient"]["utility"])
    assert int((state.entry_kind == POOLED).sum()) == kept_by_policy * pooled
    assert kept_chunks <= kept_by_policy <= kept_chunks + (method.first_full_frame(FRAMES) // 2 - len(decisions))
    # the last frames are held at full resolution: the recent window and a partly left chunk
    assert set(range(method.first_full_frame(FRAMES), FRAMES)) <= set(state.frames_held())


def test_the_kv_budget_is_never_exceeded_and_drops_the_least_useful_chunk(tmp_path):
    model = _model()
    _modules(model, tmp_path)
    layout = HistoryLayout.of(model.config)
    window = (3 + 2 - 1) * layout.frame_len
    pooled = pooling_matrix(layout, 2, 2, 2).shape[0]
    method = KVEfficient(modules=str(tmp_path), chunk_frames=2, recent_frames=3, keep_threshold=0.0,
                         kv_budget=window + 2 * pooled)  # room for two kept chunks beside the window
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), method)
    images, proprio, text = _episode(frames=16)
    policy.reset()
    drops = 0
    for i in range(16):
        out = policy.step(images[i:i + 1], text, proprio[i:i + 1])
        assert out.entries <= method.kv_budget and out.attended_entries <= method.kv_budget
        drops += out.notes["budget_drops"]
    assert drops > 0
    utilities = policy.state.method_memory["kv_efficient"]["utility"]
    assert len(utilities) == 2  # the two most useful chunks are the ones still held
    with pytest.raises(ValueError, match="cannot hold the recent window"):
        HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), KVEfficient(modules=str(tmp_path), recent_frames=3, kv_budget=10))


def test_pooling_averages_each_patch_group_over_the_chunk():
    layout = HistoryLayout(num_text=2, num_visual=2 * 16, num_action_tokens=2)  # two cameras of 4 x 4 patches
    matrix = pooling_matrix(layout, cameras=2, chunk_frames=2, spatial_pool=2)
    assert matrix.shape == (1 + 2 * 4 + 1, 2 * layout.frame_len)
    assert torch.allclose(matrix.sum(1), torch.ones(len(matrix)))
    # the first group of camera 0: patches (0,0),(0,1),(1,0),(1,1) of both frames, offset by BOS
    members = torch.nonzero(matrix[1]).flatten().tolist()
    assert members == [1, 2, 5, 6, layout.frame_len + 1, layout.frame_len + 2, layout.frame_len + 5,
                       layout.frame_len + 6]
    with pytest.raises(ValueError, match="divide"):
        pooling_matrix(layout, cameras=2, chunk_frames=2, spatial_pool=3)


def test_kv_efficient_state_resets_per_episode(tmp_path):
    model = _model()
    _modules(model, tmp_path)
    policy = HistoryVLAPolicy(model, HistoryConfig(frame_stride=2), KVEfficient(modules=str(tmp_path), recent_frames=2,
                                                                  keep_threshold=0.0, kv_budget=10**6))
    images, proprio, text = _episode()
    first = _stepped(policy, images, proprio, text)
    other_images, other_proprio, _ = _episode(seed=1)
    _stepped(policy, other_images, other_proprio, text)
    assert torch.equal(first, _stepped(policy, images, proprio, text))
    with pytest.raises(HistoryError, match="batch 1"):
        policy.reset()
        policy.step(images[:2], text.expand(2, -1), proprio[:2])


def _demo_file(path, length=44):
    h5py = pytest.importorskip("h5py")
    from kvla.testbed.data import CAMERA_KEYS
    from kvla.testbed.sim import CAMERA, TASKS, WRIST_CAMERA

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for task in ("reach-v3", "push-v3"):
            for seed in range(3):
                g = data.create_group(f"demo_{len(data)}")
                g.attrs.update(num_samples=length, task=task, instruction=TASKS[task], seed=seed, success=True)
                for camera in (CAMERA, WRIST_CAMERA):
                    g.create_dataset(f"obs/{CAMERA_KEYS[camera]}",
                                     data=rng.integers(0, 255, (length, 32, 32, 3), dtype=np.uint8))
                g.create_dataset("obs/proprio", data=rng.standard_normal((length, 4)).astype(np.float32))
                g.create_dataset("actions", data=rng.uniform(-1, 1, (length, 4)).astype(np.float32))
        f.attrs["cameras"] = [CAMERA, WRIST_CAMERA]
        f.attrs["image_size"] = 32


def test_training_resumes_exactly_and_its_lora_merges_into_the_policy(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from kvla.testbed.train_kv_efficient import KVEfficientTrainConfig, train_kv_efficient

    checkpoint, data = tmp_path / "history-vla", tmp_path / "demos.hdf5"
    make_history_checkpoint(checkpoint)
    _demo_file(data)
    method = "kv_efficient:recent_frames=2:keep_threshold=0.0"
    config = dict(data=(str(data),), checkpoint=str(checkpoint), method=method, summary_width=8, gate_width=8,
                  lora_rank=4, episodes_per_task=2, val_episodes_per_task=1, val_every=2, log_every=1,
                  mixed_precision="no", lr=1e-2)
    train_kv_efficient(KVEfficientTrainConfig(out=str(tmp_path / "a"), max_steps=4, **config), progress=False)
    train_kv_efficient(KVEfficientTrainConfig(out=str(tmp_path / "b"), max_steps=4, max_minutes=1e-9, **config),
                       progress=False)
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["step"] == 1
    train_kv_efficient(KVEfficientTrainConfig(out=str(tmp_path / "b"), max_steps=4, **config), resume=True,
                       progress=False)
    from safetensors.torch import load_file

    for name in ("kv_efficient_modules.safetensors", "lora.safetensors"):
        straight, resumed = (load_file(str(tmp_path / run / "checkpoint" / name)) for run in "ab")
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.allclose(straight[key], resumed[key], atol=1e-6), (name, key)
    lora = load_file(str(tmp_path / "a" / "checkpoint" / "lora.safetensors"))
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in lora.items())

    # the policy's model has the LoRA merged; the training pass (adapter active) computes the same actions
    from kvla.engine.history import HistoryEngine
    from kvla.testbed.train_kv_efficient import _lora

    modules_dir = tmp_path / "a" / "checkpoint"
    base = VLAModel.from_pretrained(checkpoint)
    policy = HistoryVLAPolicy(base, HistoryConfig(frame_stride=2), f"{method}:modules={modules_dir}")
    assert policy.model is not base  # the caller's model keeps its own weights
    wrapped = VLAModel.from_pretrained(checkpoint)
    peft_model, _ = _lora(wrapped.language_model, 4, 16)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, lora)
    images, proprio, _ = _episode(frames=9)
    text = torch.randint(4, 20, (1, base.config.num_text_tokens), generator=torch.Generator().manual_seed(0))
    stepped = _stepped(policy, images, proprio, text)
    with torch.no_grad():
        reference, _, _ = compressed_sequence_logits(wrapped, HistoryEngine(wrapped.language_model),
                                                     KVEfficientModules.load(modules_dir), policy.method, images,
                                                     proprio, text, hard=True)
    assert (stepped - reference).abs().max() < 1e-3


def test_a_fresh_gate_starts_at_its_initial_keep_and_refuses_an_impossible_one():
    from kvla.methods.kv_efficient import KVEfficientModulesConfig
    from kvla.testbed.train_kv_efficient import fresh_modules

    config = KVEfficientModulesConfig(kv_width=16, summary_width=8, gate_width=8)
    modules = fresh_modules(config, 0.9)
    with torch.no_grad():
        modules.utility.weight.zero_()  # leave only the bias: the utility is then exactly initial_keep
        logits, _ = modules.chunk_logits(torch.randn(1, 5, 16))
    assert torch.allclose(torch.sigmoid(logits), torch.full((1, 5), 0.9))
    for impossible in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="initial_keep"):
            fresh_modules(config, impossible)
