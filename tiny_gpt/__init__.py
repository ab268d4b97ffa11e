"""tiny_gpt: GraLoRA vs LoRA vs full fine-tuning in miniature, on a laptop CPU.

    model.py     a nanoGPT-style causal GPT (GPT-2 module names) with a KV cache for fast greedy decoding
    data.py      a character tokenizer; a corpus of small Python programs; "toy HumanEval" tasks whose
                 held-out split is made of compositions never seen in training
    evaluate.py  passes(program, test): contained execution; pass@1 with greedy decoding
    train.py     presets, cached pretraining, fine-tuning with fft / lora / gralora / hybrid
    report.py    the results table and the sweep figure
    __main__.py  `python -m tiny_gpt`, the main job

In a notebook:

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
