"""What each kind of history context is worth to the frozen history VLA: teacher-forced action
cross-entropy on the held-out episodes kv_efficient's trainer validates on (4 per task), with
the whole history, the last 3 or 7 earlier frames, and kv_efficient's cache with every old chunk
kept (pooled) or every one dropped (its recent window alone), no LoRA. Run alone (2 threads).

    python scripts/history_context_losses.py data/mt10_wrist.hdf5 data/memory_wrist.hdf5
"""

import json
import sys

import torch
import torch.nn.functional as F

from kvla.engine.history import HistoryEngine
from kvla.methods.base import parse_method
from kvla.methods.kv_efficient import KVEfficientModules, KVEfficientModulesConfig
from kvla.model.history import load_history_config, sequence_logits
from kvla.model.reference import InstructionTokenizer, checkpoint_cameras
from kvla.model.vla import VLAModel
from kvla.testbed.data import demo_index
from kvla.testbed.train import split_demos
from kvla.testbed.train_history import frame_index, load_episodes
from kvla.testbed.train_kv_efficient import compressed_sequence_logits


def constant_gate(kv_width: int, logit: float) -> KVEfficientModules:
    """A gate whose every utility is sigmoid(logit): keeps (or drops) every chunk."""
    modules = KVEfficientModules(KVEfficientModulesConfig(kv_width))
    with torch.no_grad():
        modules.utility.weight.zero_()
        modules.utility.bias.fill_(logit)
    return modules.eval()


@torch.no_grad()
def main(paths: list[str], checkpoint: str = "checkpoints/history-vla-v1") -> None:
    torch.set_num_threads(2)
    model = VLAModel.from_pretrained(checkpoint).eval()
    history = load_history_config(checkpoint)
    tokenizer, cameras = InstructionTokenizer.load(checkpoint), checkpoint_cameras(checkpoint)
    engine = HistoryEngine(model.language_model)
    method = parse_method("kv_efficient")
    kv_width = 2 * model.language_model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_heads)
    keep_all, drop_all = constant_gate(kv_width, 10.0), constant_gate(kv_width, -10.0)
    for path in paths:
        names = [info.name for info in split_demos(demo_index(path), 4)[1]]
        totals, tokens = {}, 0
        for episode in load_episodes([path], {path: names}, tokenizer, cameras, model.config.action_chunk):
            index = frame_index(len(episode.targets), history.frame_stride, 0, history.max_frames)
            images, proprio, text = episode.images[index], episode.proprio[index], episode.text_ids
            targets = model.actions_to_tokens(episode.targets[index]).flatten()
            logits = {
                "history_full": sequence_logits(model, engine, images, proprio, text),
                "last 3 earlier frames": sequence_logits(model, engine, images, proprio, text, window=3),
                "last 7 earlier frames": sequence_logits(model, engine, images, proprio, text, window=7),
                "kv_efficient, every chunk kept": compressed_sequence_logits(
                    model, engine, keep_all, method, images, proprio, text, hard=True)[0],
                "kv_efficient, every chunk dropped": compressed_sequence_logits(
                    model, engine, drop_all, method, images, proprio, text, hard=True)[0],
            }
            for name, value in logits.items():
                totals[name] = totals.get(name, 0.0) + F.cross_entropy(
                    value.float().flatten(0, 1), targets, reduction="sum").item()
            tokens += targets.numel()
        print(path, json.dumps({name: round(total / tokens, 4) for name, total in totals.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
