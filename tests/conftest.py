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
