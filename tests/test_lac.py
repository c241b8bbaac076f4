"""LAC: the differentiable reuse path against the model's own forward and the inference engine,
the relaxed masks, the method's reuse set, recovery, and resumable, reproducible training."""

import json

import numpy as np
import pytest
import torch

from kvla import EpisodeState
from kvla.engine.mixed import mixed_reuse_forward
from kvla.engine.plan import ReusePlan
from kvla.engine.prefill import PartialPrefillEngine
from kvla.methods import LearnedCaching, PlanContext, method_label, parse_method
from kvla.methods.lac import LACModules, LACModulesConfig, motion_input, patches_to_images, selector_inputs
from kvla.model.reference import InstructionTokenizer, reference_config
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.testbed.sim import CAMERA, TASKS, WRIST_CAMERA
from kvla.testbed.train import action_logits, save_observation_spec
from kvla.testbed.train_lac import LACTrainConfig, token_masks, train_lac

TINY = dict(image_size=32, patch_size=8, vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)


def _two_camera_model(parallel=True):
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    chunk = 2 if parallel else 1
    model = VLAModel(reference_config(tokenizer, parallel=parallel, action_chunk=chunk, num_layers=3, num_cameras=2,
                                      **TINY)).eval()
    return model, tokenizer


def _inputs(model, tokenizer, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (batch, 2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    proprio = torch.randn(batch, 4, generator=generator)
    return images, proprio, tokenizer.encode_batch([TASKS["push-v3"]] * batch)


@pytest.mark.parametrize("parallel", [True, False])
def test_mixed_forward_with_weight_one_is_the_models_own_forward(parallel):
    model, tokenizer = _two_camera_model(parallel)
    engine = PartialPrefillEngine(model.language_model)
    images, proprio, text = _inputs(model, tokenizer)
    other, _, _ = _inputs(model, tokenizer, seed=1)
    with torch.no_grad():
        embeds = model.prompt_embeddings(model.encode_images(images), text, proprio)
        cache = mixed_reuse_forward(engine, model.prompt_embeddings(model.encode_images(other), text, proprio),
                                    model.layout).kv
        mixed = mixed_reuse_forward(engine, embeds, model.layout, cache, torch.ones(2, model.layout.num_visual))
        own = model.language_model.model(inputs_embeds=embeds).last_hidden_state
        own = model.language_model.lm_head(own[:, model.layout.output_positions])
    assert torch.allclose(mixed.logits, own, atol=1e-5)
    if parallel:  # and the training loss's logits
        targets = model.actions_to_tokens(torch.zeros(2, model.config.num_action_tokens))
        assert torch.allclose(mixed.logits, action_logits(model, images, proprio, text, targets), atol=1e-5)


@pytest.mark.parametrize("parallel", [True, False])
def test_mixed_forward_with_a_hard_mask_is_the_partial_prefill(parallel):
    model, tokenizer = _two_camera_model(parallel)
    engine = PartialPrefillEngine(model.language_model)
    layout = model.layout
    earlier, proprio, text = _inputs(model, tokenizer, seed=2)
    current, _, _ = _inputs(model, tokenizer, seed=3)
    generator = torch.Generator().manual_seed(4)
    recompute = (torch.rand(2, layout.num_visual, generator=generator) > 0.4).float()
    with torch.no_grad():
        first = model.prompt_embeddings(model.encode_images(earlier), text, proprio)
        now = model.prompt_embeddings(model.encode_images(current), text, proprio)
        mixed = mixed_reuse_forward(engine, now, layout, mixed_reuse_forward(engine, first, layout).kv, recompute)
        state = EpisodeState()
        engine.prefill(first, layout, ReusePlan.full(2, layout, engine.num_layers), state)
        depth = torch.where(recompute > 0, engine.num_layers, 0).long()
        partial = engine.prefill(now, layout, ReusePlan(visual_depth=depth), state)
        fresh = mixed_reuse_forward(engine, now, layout)
    assert torch.allclose(mixed.logits, partial.logits, atol=1e-5)
    assert (mixed.logits - fresh.logits).abs().max() > 1e-3  # the reuse did change the outputs


def test_gradients_reach_the_recompute_weight_only():
    model, tokenizer = _two_camera_model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    engine = PartialPrefillEngine(model.language_model)
    earlier, proprio, text = _inputs(model, tokenizer, seed=5)
    current, _, _ = _inputs(model, tokenizer, seed=6)
    with torch.no_grad():
        cache = mixed_reuse_forward(engine, model.prompt_embeddings(model.encode_images(earlier), text, proprio),
                                    model.layout).kv
        embeds = model.prompt_embeddings(model.encode_images(current), text, proprio)
    weight = torch.full((2, model.layout.num_visual), 0.5, requires_grad=True)
    mixed_reuse_forward(engine, embeds, model.layout, cache, weight).logits.logsumexp(-1).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_mixed_forward_refuses_a_cache_of_another_shape():
    model, tokenizer = _two_camera_model()
    engine = PartialPrefillEngine(model.language_model)
    images, proprio, text = _inputs(model, tokenizer)
    with torch.no_grad():
        embeds = model.prompt_embeddings(model.encode_images(images), text, proprio)
        cache = mixed_reuse_forward(engine, embeds[:1], model.layout).kv
        with pytest.raises(ValueError, match="recompute_weight"):
            mixed_reuse_forward(engine, embeds, model.layout, cache, None)
        with pytest.raises(ValueError, match="same layout and batch"):
            mixed_reuse_forward(engine, embeds, model.layout, cache, torch.ones(2, model.layout.num_visual))


def test_token_masks_are_hard_top_k_forward_and_sigmoid_backward():
    saliency = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]], requires_grad=True)
    ratios = torch.tensor([0.0, 0.4, 0.8])
    masks = token_masks(torch.logit(saliency), ratios, temperature=0.1)
    assert masks[0, 0].tolist() == [1, 1, 1, 1, 1]
    assert masks[0, 1].tolist() == [1, 0, 1, 0, 1]  # the two lowest (0.1, 0.3) are reused
    assert masks[0, 2].tolist() == [1, 0, 0, 0, 0]  # four of five
    # backward: the gradient of sum_i sigmoid((s_i - theta) / tau), theta = (s_(2) + s_(3)) / 2 = (0.3 + 0.5) / 2
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25])
    (masks[0, 1] * weights).sum().backward()
    reference = saliency.detach().clone().requires_grad_(True)
    theta = 0.5 * (reference[0, 3] + reference[0, 2])
    (torch.sigmoid((reference[0] - theta) / 0.1) * weights).sum().backward()
    assert torch.allclose(saliency.grad, reference.grad, atol=1e-5)
    # raising every saliency alike moves no threshold crossing: no gradient along that direction
    scores = torch.logit(torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])).requires_grad_(True)
    shift = torch.zeros(1, requires_grad=True)
    token_masks(torch.logit(torch.sigmoid(scores.detach()) + shift), ratios, 0.1)[0, 1].sum().backward()
    assert abs(shift.grad.item()) < 1e-5
    # saturated saliencies still rank by their logits, not by token order
    tied = torch.tensor([[40.0, 30.0, 50.0, 20.0]])
    assert token_masks(tied, torch.tensor([0.5]), 0.1)[0, 0].tolist() == [1, 0, 1, 0]


def test_patches_to_images_inverts_the_models_patches():
    model = VLAModel.from_preset("tiny", num_cameras=2)
    images = torch.randint(0, 255, (3, 2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(patches_to_images(model.image_patches(images), 2), images)
    with pytest.raises(ValueError, match="square grid"):
        patches_to_images(torch.zeros(1, 10, 3 * 64), 2)


def test_flow_input_measures_the_motion_direction_and_difference_sees_none_on_a_still_frame():
    rng = np.random.default_rng(0)
    texture = (np.kron(rng.integers(0, 255, (16, 16, 3)), np.ones((8, 8, 1)))).astype(np.float32)
    import cv2

    texture = cv2.GaussianBlur(texture, (0, 0), 3).astype(np.uint8)
    shifted = np.roll(texture, 4, axis=1)  # 4 px right at 128 px: 2 px at the 64 px input
    config = LACModulesConfig(num_cameras=1, image_size=128, patch_size=16, motion="flow")
    flow = motion_input(shifted, texture, config)[3:] * config.flow_pixel_scale
    inner = flow[:, 8:-8, 8:-8]
    assert abs(np.median(inner[0]) - 2.0) < 0.3 and abs(np.median(inner[1])) < 0.3
    difference = LACModulesConfig(num_cameras=1, image_size=128, patch_size=16, motion="difference")
    assert motion_input(texture, texture, difference).shape == (6, 64, 64)
    assert np.abs(motion_input(texture, texture, difference)[3:]).max() == 0
    with pytest.raises(ValueError, match="motion"):
        LACModulesConfig(num_cameras=1, image_size=128, patch_size=16, motion="raft")


@pytest.fixture
def tiny_modules(tmp_path):
    model = VLAModel.from_preset("tiny", num_cameras=2)
    torch.manual_seed(0)
    modules = LACModules(LACModulesConfig(num_cameras=2, image_size=32, patch_size=8, input_size=16, width=4))
    modules.save(tmp_path / "lac")
    return model, tmp_path / "lac"


def _context(model, images, state):
    patches = model.image_patches(model.policy_images(images))
    return PlanContext(patches=patches, state=state, layout=model.layout, num_layers=model.config.num_layers)


def test_lac_reuses_the_lowest_saliency_tokens_at_the_chosen_ratio(tiny_modules):
    model, directory = tiny_modules
    frames = [torch.randint(0, 255, (2, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
              for s in range(3)]
    text = torch.randint(3, 200, (2, model.config.num_text_tokens))
    method = parse_method(f"lac:modules={directory}:fixed_ratio=0.25:recovery=0:change=learned")
    assert method_label(method) == f"lac:modules={directory}:recovery=0.0:fixed_ratio=0.25:change=learned"
    policy = CachedVLAPolicy(model, method)
    first = policy.step(frames[0], text)
    assert first.reuse_ratio == 0.0  # the first call of an episode is full
    ctx = _context(model, frames[1], policy.state)
    saliency, ratio = method.decide(ctx, frames[1], frames[0])
    second = policy.step(frames[1], text)
    reused = second.visual_depth == 0
    expected = torch.zeros_like(reused)
    expected.scatter_(1, saliency.argsort(dim=1)[:, :8], True)  # round(32 * 0.25) lowest
    assert torch.equal(reused, expected) and ratio.tolist() == [0.25, 0.25]
    # max_age=2: what was reused at the last call is not reused again now
    third = policy.step(frames[2], text)
    assert not (third.visual_depth[reused] == 0).any()
    # every layer of each reused token: the step's reuse is exactly the chosen fraction
    assert second.reuse_ratio == pytest.approx(0.25)


def test_lac_predictor_ratio_and_reproducible_recovery(tiny_modules):
    model, directory = tiny_modules
    frames = [torch.randint(0, 255, (1, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
              for s in range(6)]
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))

    def run(spec):
        policy = CachedVLAPolicy(model, spec)
        policy.reset()
        return [policy.step(f, text).visual_depth.clone() for f in frames], policy

    base = f"lac:modules={directory}:max_age=0:fixed_ratio=0.9:change=learned"
    no_recovery, _ = run(base + ":recovery=0")
    seeded, policy = run(base + ":recovery=0.3:seed=1")
    again, _ = run(base + ":recovery=0.3:seed=1")
    other, _ = run(base + ":recovery=0.3:seed=2")
    assert all(torch.equal(a, b) for a, b in zip(seeded, again))
    assert any(not torch.equal(a, b) for a, b in zip(seeded, other))
    # recovery only ever recomputes tokens the selector chose for reuse
    for plain, recovered in zip(no_recovery, seeded):
        assert ((recovered == 0) <= (plain == 0)).all()
    recovered_share = 1 - sum((d == 0).sum().item() for d in seeded) / sum((d == 0).sum().item() for d in no_recovery)
    assert 0.1 < recovered_share < 0.5
    # reset: the next episode draws the same recoveries
    policy.reset()
    assert all(torch.equal(policy.step(f, text).visual_depth, d) for f, d in zip(frames, seeded))
    # the predictor's argmax ratio when no ratio is fixed
    plain = parse_method(f"lac:modules={directory}:recovery=0:max_age=0:change=learned")
    policy = CachedVLAPolicy(model, plain)
    policy.step(frames[0], text)
    modules = LACModules.load(directory)
    _, logits = modules(selector_inputs(frames[1], frames[0], modules.config), 1)
    out = policy.step(frames[1], text)
    assert (out.visual_depth == 0).sum().item() == round(32 * modules.config.ratios[logits.argmax().item()])
    assert out.notes["ratio"] == pytest.approx(modules.config.ratios[logits.argmax().item()])
    # the previous frame and the generator belong to the episode: reset() forgets them
    assert policy.state.method_memory["lac"]["previous_images"] is not None
    policy.reset()
    assert policy.state.method_memory == {} and policy.step(frames[2], text).reuse_ratio == 0.0


def test_lac_names_missing_or_mismatched_modules(tiny_modules, tmp_path):
    model, directory = tiny_modules
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    frame = torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="kvla train lac"):
        CachedVLAPolicy(model, f"lac:modules={tmp_path / 'nowhere'}").step(frame, text)
    one_camera = VLAModel.from_preset("tiny")
    with pytest.raises(ValueError, match="trained for 2 camera"):
        CachedVLAPolicy(one_camera, f"lac:modules={directory}").step(frame[:, 0], text)
    with pytest.raises(ValueError, match="recovery"):
        LearnedCaching(recovery=1.5)


def _tiny_checkpoint(tmp_path):
    from test_training import _write_demo_file

    data = tmp_path / "demos.hdf5"
    _write_demo_file(data, (CAMERA, WRIST_CAMERA), episodes_per_task=4, length=9)
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=2, num_layers=2, num_cameras=2, **TINY))
    checkpoint = tmp_path / "vla"
    model.save_pretrained(checkpoint)
    tokenizer.save(checkpoint)
    save_observation_spec(checkpoint, (CAMERA, WRIST_CAMERA), 32)
    return data, checkpoint


def test_lac_training_resumes_to_the_same_modules_and_they_plug_into_the_policy(tmp_path):
    pytest.importorskip("h5py")
    data, checkpoint = _tiny_checkpoint(tmp_path)
    settings = dict(checkpoint=str(checkpoint), data=str(data), input_size=16, width=4, episodes_per_task=2,
                    held_out_per_task=1, val_episodes_per_task=1, stage1_steps=3, stage2_steps=4, explore_steps=2, batch_size=4,
                    val_every=2, log_every=1, mixed_precision="no")
    straight = train_lac(LACTrainConfig(out=str(tmp_path / "a"), **settings), progress=False)
    train_lac(LACTrainConfig(out=str(tmp_path / "b"), **settings), progress=False, stop_at_step=5)
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["step"] == 5
    after_exploring = LACModules.load(tmp_path / "b" / "checkpoint").state_dict()
    with pytest.raises(ValueError, match="another shape"):
        train_lac(LACTrainConfig(out=str(tmp_path / "b"), **{**settings, "motion": "difference"}), resume=True,
                  progress=False)
    resumed = train_lac(LACTrainConfig(out=str(tmp_path / "b"), **settings), resume=True, progress=False)
    assert straight["step"] == resumed["step"] == 7
    assert {"loss_vla", "expected_ratio", "val_loss_full", "val_loss_reuse", "val_agreement"} <= set(straight)
    a, b = LACModules.load(tmp_path / "a" / "checkpoint"), LACModules.load(tmp_path / "b" / "checkpoint")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [entry["stage"] for entry in log] == [1, 1, 1, 2, 2, 2, 2]
    assert [entry["explore"] for entry in log] == [False, False, False, True, True, False, False]
    assert len(log[-1]["val_loss_at_ratio"]) == len(a.config.ratios)
    # stage I and the exploration steps train the selector only; the predictor trains after them
    train_lac(LACTrainConfig(out=str(tmp_path / "c"), **settings), progress=False, stop_at_step=3)
    after_stage_one, final = LACModules.load(tmp_path / "c" / "checkpoint").state_dict(), a.state_dict()
    predictor = [k for k in final if k.startswith("predictor")]
    assert all(torch.equal(after_exploring[k], after_stage_one[k]) for k in predictor)
    assert all(not torch.equal(final[k], after_stage_one[k]) for k in predictor)
    assert not torch.equal(after_exploring["selector.head.weight"], after_stage_one["selector.head.weight"])
    # the trained modules drive the method on the VLA they were trained for
    model = VLAModel.from_pretrained(checkpoint)
    policy = CachedVLAPolicy(model, f"lac:modules={tmp_path / 'a' / 'checkpoint'}")
    text = InstructionTokenizer.load(checkpoint).encode_batch([TASKS["push-v3"]])
    for seed in range(3):
        frame = torch.randint(0, 255, (1, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        out = policy.step(frame, text, torch.zeros(1, 4))
        assert out.actions.shape == (1, 8)


def test_stage_one_target_is_the_instruction_attention_of_the_eager_model():
    from kvla.testbed.train_lac import attention_target

    model, tokenizer = _two_camera_model()
    engine = PartialPrefillEngine(model.language_model)
    images, proprio, text = _inputs(model, tokenizer)
    layout = model.layout
    with torch.no_grad():
        embeds = model.prompt_embeddings(model.encode_images(images), text, proprio)
        target = attention_target(engine, embeds, layout)
        model.language_model.set_attn_implementation("eager")
        maps = model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
        model.language_model.set_attn_implementation("sdpa")
    text_rows = torch.arange(*layout.text_span)
    # mean over layers, heads and instruction rows of the attention to each visual token
    attention = torch.stack([m[:, :, text_rows][..., layout.visual_positions] for m in maps]).mean(dim=(0, 2, 3))
    low, high = attention.min(1, keepdim=True).values, attention.max(1, keepdim=True).values
    assert torch.allclose(target, (attention - low) / (high - low), atol=1e-4)


def test_lac_photometric_veto_recomputes_exactly_the_tokens_whose_light_changed(tiny_modules):
    """change=photometric: the selector's choice, less every token whose patch's channel mean or
    contrast moved more than `levels` grey levels; learned (the default) leaves them reusable."""
    model, directory = tiny_modules
    generator = torch.Generator().manual_seed(3)
    frame = torch.randint(40, 200, (1, 2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    dimmed = frame.clone()
    dimmed[:, 0, :16] = (dimmed[:, 0, :16].float() * 0.8).round().to(torch.uint8)  # a shadow on camera 0's top half
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))

    def second_step(spec):
        policy = CachedVLAPolicy(model, spec)
        policy.step(frame, text)
        return policy.step(dimmed, text).visual_depth == 0

    base = f"lac:modules={directory}:fixed_ratio=0.9:recovery=0:change=learned"
    learned, vetoed = second_step(base), second_step(base.replace(":change=learned", ":change=photometric"))
    shaded = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    shaded[:, 0, :2] = True  # patches of 8 px: the top 2 rows of camera 0's 4x4 grid
    shaded = shaded.flatten(1)
    assert learned[shaded].any()  # the trained-on-plain-frames selector does reuse shaded tokens here
    assert not vetoed[shaded].any()
    assert torch.equal(vetoed, learned & ~shaded)  # the veto takes nothing else away
    assert method_label(parse_method(base)).endswith("change=learned")
    assert "change" not in method_label(parse_method(base.replace(":change=learned", "")))  # photometric: the default
    with pytest.raises(ValueError, match="lac change must be one of learned, photometric"):
        parse_method("lac:change=cosine")


def test_a_guard_breach_on_lac_stops_its_reuse_until_agreement_returns(tiny_modules):
    """lac reuses only the previous call's K/V (age 1): the guard's cap at a breach is at most half
    the oldest reused age, 1, so the next steps reuse nothing; agreement relaxes it to 2 again."""
    from kvla.guard import FidelityGuard

    model, directory = tiny_modules
    frames = [torch.randint(0, 255, (1, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
              for s in range(6)]
    text = torch.randint(3, 200, (1, model.config.num_text_tokens))
    guard = FidelityGuard(every=2, bound=0.0, start_age=8, relax_after=1)
    policy = CachedVLAPolicy(model, f"lac:modules={directory}:fixed_ratio=0.5:recovery=0:change=learned", guard=guard)
    outs = [policy.step(f, text) for f in frames[:3]]
    assert outs[1].reuse_ratio > 0 and outs[2].notes["guard"]["checked"]
    assert outs[2].notes["guard"]["refreshed"] and outs[2].notes["guard"]["max_age"] == 1
    assert policy.step(frames[3], text).reuse_ratio == 0.0  # capped: nothing reused
    policy.guard = FidelityGuard(every=1, bound=10.0, start_age=8, relax_after=1)
    relaxed = policy.step(frames[4], text)  # a check within the bound: the cap doubles to 2
    assert relaxed.notes["guard"]["max_age"] == 2
    assert policy.step(frames[5], text).reuse_ratio > 0
