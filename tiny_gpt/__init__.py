"""tiny_gpt: GraLoRA vs LoRA vs full fine-tuning in miniature, on a laptop CPU (model, data, evaluate, train,
report; `python -m tiny_gpt` is the main job). In a notebook:

    from tiny_gpt import PRESETS, pick_device, pretrain, finetune
    preset, device = PRESETS["cpu"], pick_device()
    base_state, _ = pretrain(preset.gpt, preset.train, device)
    row = finetune(base_state, "gralora", rank=16, seed=0, preset=preset, device=device)
"""

from .data import CharTokenizer, make_corpus, make_tasks
from .evaluate import complete, pass_at_1, passes
from .model import GPT, GPTConfig
from .report import METHOD_COLORS, format_table, plot_sweep, summarize
from .train import (METHODS, PRESETS, Preset, TrainConfig, adapter_spec, finetune, pick_device, pretrain, tasks_for,
                    write_json)

__all__ = ["CharTokenizer", "make_corpus", "make_tasks", "complete", "pass_at_1", "passes", "GPT", "GPTConfig",
           "METHOD_COLORS", "METHODS", "PRESETS", "Preset", "TrainConfig", "adapter_spec", "finetune", "format_table",
           "pick_device", "plot_sweep", "pretrain", "summarize", "tasks_for", "write_json"]
