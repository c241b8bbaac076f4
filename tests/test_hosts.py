"""VLM hosts (LLaVA with Llama and Qwen2, PaliGemma, Idefics3 / SmolVLM) driven through kvla:
against each host's own forward and generate, with nothing reused and with an unchanged frame
whose every visual token is reused; pixels against the hosts' own image processors."""

import warnings

import numpy as np
import pytest
import torch
import transformers

from kvla import EpisodeState, ReusePlan
from kvla.engine.compat import UnsupportedModelError
from kvla.hosts import wrap
from kvla.policy import CachedVLAPolicy

VOCAB, BOS, IMAGE, FAKE, GLOBAL, SEPARATOR = 600, 1, 3, 4, 5, 6
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
NUM_TEXT, ACTION_DIM = 5, 4


def make_host(name: str, seed: int = 0):
    """A tiny random-weight VLM built from its config (no hub) and kvla's wrapper of it."""
    torch.manual_seed(seed)
    T = transformers
    if name in ("llava-llama", "llava-qwen2"):
        text = T.LlamaConfig(**TEXT) if name == "llava-llama" else T.Qwen2Config(**TEXT)
        vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8, projection_dim=32)
        host = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE))
        options = {}
    elif name == "paligemma":
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8)
        host = T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            vision_config=vision, text_config=T.GemmaConfig(**TEXT, head_dim=16), image_token_id=IMAGE,
            projection_dim=64, hidden_size=64, vocab_size=VOCAB))
        options = {"separator_token_id": SEPARATOR}
    elif name == "idefics3":
        host = T.Idefics3ForConditionalGeneration(T.Idefics3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=64, patch_size=8),
            text_config=T.LlamaConfig(**TEXT), image_token_id=IMAGE, scale_factor=2))
        options = {"fake_image_token_id": FAKE, "global_image_token_id": GLOBAL}
    elif name in ("qwen2-vl", "qwen2.5-vl"):
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        ids = dict(image_token_id=IMAGE, vision_start_token_id=FAKE, vision_end_token_id=GLOBAL, video_token_id=SEPARATOR)
        if name == "qwen2-vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2)
            host = T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
            host = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        options = {"image_size": 32}
    else:
        raise KeyError(name)
    host.eval()
    return host, options


HOSTS = ["llava-llama", "llava-qwen2", "paligemma", "idefics3", "qwen2-vl", "qwen2.5-vl"]


def _vla(name, cameras=1, **options):
    host, adapter_options = make_host(name)
    return wrap(host, adapter_options=adapter_options, num_cameras=cameras, num_text_tokens=NUM_TEXT,
                action_dim=ACTION_DIM, **options)


def _inputs(vla, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    side = vla.config.image_size
    frames = torch.randint(0, 256, (batch, vla.config.num_cameras, side, side, 3), generator=generator, dtype=torch.uint8)
    text = torch.randint(10, 300, (batch, NUM_TEXT), generator=generator)
    return frames, text


def _host_reference(vla, frames, text):
    """The host's own forward (logits at the last prompt position) and greedy generate."""
    host = vla.host
    ids = vla.prompt_ids(text)
    pixels = vla.pixel_values(vla.policy_images(frames))
    extra = vla.forward_arguments(ids)
    if hasattr(host.model, "rope_deltas"):
        host.model.rope_deltas = None  # Qwen-VL keeps the last prompt's position delta as module state
    with torch.no_grad():
        logits = host(input_ids=ids, pixel_values=pixels, **extra).logits[:, -1]
        tokens = host.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), **extra,
                               max_new_tokens=ACTION_DIM, min_new_tokens=ACTION_DIM, do_sample=False,
                               pad_token_id=0)[:, ids.shape[1]:]
    return logits, tokens


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", HOSTS)
def test_a_host_through_kvla_matches_its_own_forward_and_generate(name, batch):
    vla = _vla(name)
    frames, text = _inputs(vla, batch)
    ref_logits, ref_tokens = _host_reference(vla, frames, text)
    policy = CachedVLAPolicy(vla, "full")
    out = policy.step(frames, text)
    assert (out.logits[:, -1] - ref_logits).abs().max() < 1e-4
    assert torch.equal(out.action_tokens, ref_tokens)
    # the same frame again, every visual token reused in every layer
    policy_images = vla.policy_images(frames)
    embeds = vla.prompt_embeddings(vla.encode_images(policy_images), text)
    reuse_all = ReusePlan(visual_depth=torch.zeros(batch, vla.layout.num_visual, dtype=torch.long))
    result = policy.engine.prefill(embeds, vla.layout, reuse_all, policy.state)
    assert result.computed_tokens == [vla.layout.seq_len - vla.layout.num_visual] * policy.engine.num_layers
    assert (result.logits[:, -1] - ref_logits).abs().max() < 1e-4
    assert torch.equal(policy.engine.decode_greedy(result.logits[:, -1], vla.layout, policy.state), ref_tokens)


@pytest.mark.parametrize("name", HOSTS)
def test_two_cameras_and_a_reuse_method_run_on_every_host(name):
    """Two cameras, vla_cache over a static scene: visual tokens are reused and the actions stay
    those of the host on the unchanged frames (the reuse is exact when nothing changed)."""
    vla = _vla(name, cameras=2)
    frames, text = _inputs(vla, 1, seed=3)
    reference = _host_reference(vla, frames, text)[1]
    policy = CachedVLAPolicy(vla, "vla_cache:schedule=none:max_age=100")
    outs = [policy.step(frames, text) for _ in range(3)]
    assert outs[0].reuse_ratio == 0.0 and outs[-1].reuse_ratio > 0.0
    # exact under PaliGemma's prefix mask too, since the whole prefix (frames and text) is unchanged
    for out in outs:
        assert torch.equal(out.action_tokens, reference)


def test_the_layouts_follow_each_host_s_template():
    llava = _vla("llava-llama", cameras=2)
    assert llava.layout.visual_spans == ((1, 17), (17, 33)) and llava.layout.text_span == (33, 38)
    assert llava.layout.mask_mode == "causal" and llava.layout.position_offset == 0
    paligemma = _vla("paligemma")
    assert paligemma.layout.visual_spans == ((0, 16),) and paligemma.layout.bos_position == 16
    assert paligemma.layout.position_offset == 1 and paligemma.layout.mask_mode == "bidirectional"
    assert paligemma.prompt_ids(torch.arange(10, 15)[None])[0, -1] == SEPARATOR
    idefics3 = _vla("idefics3")
    ids = idefics3.prompt_ids(torch.arange(10, 15)[None])[0].tolist()
    assert ids[:3] == [BOS, FAKE, GLOBAL] and ids[3:19] == [IMAGE] * 16 and ids[19] == FAKE
    assert idefics3.config.cell_size == 16 and idefics3.layout.mask_mode == "causal"
    qwen = _vla("qwen2-vl")  # [BOS, vision_start, 16 image tokens on a 4 x 4 grid, vision_end, text]
    temporal, height, width = qwen.layout.rope_positions
    assert temporal[2:18] == (2,) * 16 and height[2:18] == tuple(2 + i // 4 for i in range(16))
    assert width[2:18] == tuple(2 + i % 4 for i in range(16))
    assert temporal[18:] == height[18:] == width[18:] == tuple(range(6, 12))  # resumes at 2 + 4, not at slot 18
    assert qwen.layout.next_rope_position == 12
    smolvla = _vla("idefics3", mask_mode="prefix_lm")  # SmolVLA: bidirectional over images and language
    assert smolvla.layout.blocks == (0,) * smolvla.layout.seq_len


@pytest.mark.parametrize("processor,name", [("CLIPImageProcessor", "llava-llama"), ("SiglipImageProcessor", "paligemma"),
                                            ("SiglipImageProcessor", "idefics3"), ("Qwen2VLImageProcessor", "qwen2-vl")])
def test_pixels_are_laid_out_as_the_host_s_image_processor_does(processor, name):
    vla = _vla(name)
    frames, _ = _inputs(vla, 1, seed=5)
    options = {"do_resize": False, "do_center_crop": False}
    if name == "qwen2-vl":  # its own patch grouping: patches of 4 px, merged 2 x 2, the frame doubled in time
        options = {"do_resize": False, "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = getattr(transformers, processor)(**options)(images=frames[0, 0].numpy(), return_tensors="pt")
    ours = vla.pixel_values(vla.policy_images(frames))
    reference = processed.pixel_values
    if name == "qwen2-vl":
        assert processed.image_grid_thw.tolist() == [[1, 8, 8]]
    else:
        ours = ours.reshape(reference.shape)
    assert ours.shape == reference.shape and (ours - reference).abs().max() < 1e-5


def test_image_cells_are_the_pixels_each_visual_token_covers():
    """Changing one pixel cell changes exactly the visual token of that cell (what static detection reads)."""
    vla = _vla("idefics3")
    frames, _ = _inputs(vla, 1)
    cells = vla.image_patches(vla.policy_images(frames))
    assert cells.shape == (1, 16, 3 * 16 * 16)
    changed = frames.clone()
    changed[0, 0, 16:32, 32:48] = 0  # row 1, column 2 of the 4 x 4 grid
    diff = (vla.image_patches(vla.policy_images(changed)) - cells).abs().sum(-1)[0]
    assert diff.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_an_unknown_host_and_a_proprio_are_refused_by_name():
    class Other(torch.nn.Module):
        config = transformers.BlipConfig()

    with pytest.raises(UnsupportedModelError, match="no kvla adapter for VLM 'blip'"):
        wrap(Other())
    vla = _vla("llava-llama")
    frames, text = _inputs(vla, 1)
    with pytest.raises(ValueError, match="takes no proprio"):
        vla.prompt_embeddings(vla.encode_images(vla.policy_images(frames)), text, torch.zeros(1, 4))


@pytest.mark.parametrize("name", ["paligemma", "qwen2-vl"])
def test_every_method_runs_on_a_host_and_lac_refuses_another_grid(name):
    """The methods read the host's layout (spans, cells): static reuse of an unchanged scene stays
    exact, FastV prunes, periodic refreshes; LAC's modules, trained for the reference VLA's grid,
    refuse this one by name."""
    vla = _vla(name, cameras=2)
    frames, text = _inputs(vla, 1, seed=4)
    reference = _host_reference(vla, frames, text)[1]
    for method in ("static", "fastv", "periodic"):
        policy = CachedVLAPolicy(vla, method)
        outs = [policy.step(frames, text) for _ in range(3)]
        if method == "static":
            assert [o.reuse_ratio for o in outs] == [0.0, 1.0, 1.0]
            assert all(torch.equal(o.action_tokens, reference) for o in outs)
        if method == "fastv":
            assert all(o.reuse_ratio > 0 for o in outs)  # pruned tokens
    with pytest.raises(ValueError, match="LAC modules .* were trained for 2 camera"):
        CachedVLAPolicy(vla, "lac").step(frames, text)
