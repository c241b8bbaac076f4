"""transformers VLMs driven as kvla VLAs; `wrap(host)` picks the adapter by the host's model_type."""

from kvla.hosts.base import HostAdapter, HostConfig, HostVLA
from kvla.hosts.idefics3 import Idefics3Adapter
from kvla.hosts.llava import LlavaAdapter
from kvla.hosts.paligemma import PaliGemmaAdapter
from kvla.hosts.qwen2_vl import Qwen2VLAdapter

ADAPTERS = {"llava": LlavaAdapter, "paligemma": PaliGemmaAdapter, "idefics3": Idefics3Adapter,
            "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2VLAdapter}


def wrap(host, *, adapter_options: dict | None = None, **options) -> HostVLA:
    """A transformers VLM as a kvla VLA, e.g. `CachedVLAPolicy(wrap(model, num_text_tokens=16), "vla_cache")`."""
    from kvla.engine.compat import UnsupportedModelError

    model_type = host.config.model_type
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(f"no kvla adapter for VLM {model_type!r}: kvla wraps {', '.join(ADAPTERS)}")
    return HostVLA(host, ADAPTERS[model_type](host, **(adapter_options or {})), **options)


__all__ = ["ADAPTERS", "HostAdapter", "HostConfig", "HostVLA", "wrap"]
