import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
}


def make_lm(family: str, num_layers: int = 3, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    return model_cls(config).eval()


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
