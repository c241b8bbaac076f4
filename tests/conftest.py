import pytest
import torch
import transformers

# Small windows and caps, so that every family feature bites on test-sized prompts (about 30 tokens).
WINDOW = 6
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                                                    "attn_logit_softcapping": 0.2, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": WINDOW,
                                                        "query_pre_attn_scalar": 16, "final_logit_softcapping": 3.0}),
}
# the attention implementation each family runs under in tests (Gemma 2's soft-cap needs eager)
ATTENTION = {"gemma2": "eager"}


def make_lm(family: str, num_layers: int = 3, seed: int = 0):
    config_name, model_name, extra = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    if family == "gemma3":  # local and global layers alternate (the default pattern of 6 makes small models all local)
        extra = {**extra, "layer_types": (["sliding_attention", "full_attention"] * num_layers)[:num_layers]}
    torch.manual_seed(seed)
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    lm = model_cls(config).eval()
    lm.set_attn_implementation(ATTENTION.get(family, "sdpa"))
    # larger query weights: sharper attention, so that soft-caps and windows change the maps measurably
    for layer in lm.model.layers:
        attn = layer.self_attn
        (attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj).weight.data *= 4
    return lm


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def make_history_checkpoint(directory):
    """A tiny two-camera history VLA checkpoint (random weights) with its tokenizer, sim.json and history.json."""
    from kvla.model.history import HistoryConfig, save_history_config
    from kvla.model.reference import InstructionTokenizer, reference_config
    from kvla.model.vla import VLAModel
    from kvla.testbed.sim import CAMERA, TASKS, WRIST_CAMERA
    from kvla.testbed.train import save_observation_spec

    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    model = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=4, num_layers=2, num_cameras=2,
                                      image_size=32, patch_size=8, vision_dim=32, vision_layers=1, vision_heads=2,
                                      vision_mlp=64, hidden_size=64, intermediate_size=128, num_heads=4,
                                      num_kv_heads=4))
    model.save_pretrained(directory)
    tokenizer.save(directory)
    save_observation_spec(directory, (CAMERA, WRIST_CAMERA), 32)
    save_history_config(directory, HistoryConfig(frame_stride=4, max_frames=50))
