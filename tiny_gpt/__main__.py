"""`python -m tiny_gpt`: pretrain (or load) the base model, fine-tune it with each method, print a table.

    python -m tiny_gpt --preset smoke                          # the plumbing, in seconds
    python -m tiny_gpt                                         # the cpu preset: one rank, one seed (gpu with CUDA)
    python -m tiny_gpt --ranks 4 16 64 --seeds 0 1 2 --out results/sweep_cpu.json --fig results/sweep_cpu.png

Ranks are trainable-parameter budgets: every adapter method at rank R trains exactly as many parameters as
LoRA of rank R. GraLoRA uses r = R with k by the paper's rule; Hybrid GraLoRA puts R/2 in GraLoRA blocks and
R/2 in a plain LoRA (PEFT's semantics: the JSON row's r is the GraLoRA part, hybrid_r the LoRA part).
"""

import argparse
import dataclasses
import json
import os

import torch

from .train import (METHODS, PRESETS, adapter_spec, finetune, format_table, pick_device, plot_sweep, positive_float,
                    pretrain)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tiny_gpt",
        description="Fine-tune a tiny pretrained GPT on toy code tasks with full fine-tuning, LoRA, GraLoRA and "
        "Hybrid GraLoRA at equal trainable parameters; report val loss and held-out pass@1.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="experiment size: smoke (seconds, for tests), cpu (minutes on a laptop), "
                        "gpu (one GPU, a bigger model). Default: gpu when the device is CUDA, else cpu.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="what to run: base (the pretrained model, not fine-tuned), fft (full fine-tuning), "
                        "lora, gralora, hybrid. Default: all.")
    parser.add_argument("--ranks", nargs="+", type=int, default=None,
                        help="rank budgets (the LoRA rank with the same trainable parameters) for the adapter "
                        "methods. Default: the preset's.")
    parser.add_argument("--k", nargs="+", type=int, default=None,
                        help="GraLoRA blocks per side; several values sweep k. Default: the paper's rule, "
                        "k = 2 for a GraLoRA rank below 64, else 4. Must divide the GraLoRA rank and the width.")
    parser.add_argument("--hybrid-r", type=int, default=None,
                        help="rank of Hybrid GraLoRA's plain-LoRA part; the GraLoRA part gets the rest of the "
                        "rank budget. Default: half the budget.")
    parser.add_argument("--hybrid-max-r", type=int, default=16,
                        help="run hybrid only at rank budgets up to this (the paper uses it at r <= 16). "
                        "Default: 16.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="fine-tuning seeds (adapter init and batch order); several give mean ± std. "
                        "Default: the preset's.")
    parser.add_argument("--lr-adapter", type=positive_float, default=None,
                        help="peak learning rate of the adapter methods (LoRA, GraLoRA, Hybrid). Default: the "
                        "preset's (1e-2 on the cpu preset).")
    parser.add_argument("--out", default=None,
                        help="write the results as a JSON list of rows to this file (rewritten after every run).")
    parser.add_argument("--fig", default=None,
                        help="save the val-loss and pass@1 vs rank figure here. Default: next to --out as .png "
                        "when the run sweeps ranks, k or seeds; otherwise no figure.")
    parser.add_argument("--cache-dir", default=None,
                        help="where the pretrained base model is cached. Default: $TINY_GPT_CACHE, else "
                        ".cache/tiny_gpt in the current directory.")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0. Default: cuda, then mps, then cpu.")
    return parser, parser.parse_args(argv)


def plan_runs(methods, ranks, ks, hybrid_r, hybrid_max_r, seeds, width):
    """Every run as (method, rank, k, hybrid_r, seed), validated before any training starts.

    base runs once (it has no seed); fft once per seed (it has no rank); the adapter methods once per rank,
    k and seed. Raises ValueError on any impossible combination, naming the numbers.
    """
    runs = [("base", None, None, None, None)] if "base" in methods else []
    for seed in seeds:
        if "fft" in methods:
            runs.append(("fft", None, None, None, seed))
        for rank in ranks:
            for method in ("lora", "gralora", "hybrid"):
                if method not in methods or (method == "hybrid" and rank > hybrid_max_r):
                    continue
                for k in [None] if method == "lora" or ks is None else ks:
                    adapter_spec(method, rank, k, hybrid_r, width)  # raises ValueError if impossible
                    runs.append((method, rank, k, hybrid_r if method == "hybrid" else None, seed))
    return runs


def main(argv=None):
    parser, args = parse_args(argv)
    device = torch.device(args.device) if args.device else pick_device()
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    if args.lr_adapter is not None:
        preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, lr_adapter=args.lr_adapter))
    ranks = args.ranks or preset.ranks
    seeds = args.seeds if args.seeds is not None else preset.seeds
    try:
        runs = plan_runs(args.methods, ranks, args.k, args.hybrid_r, args.hybrid_max_r, seeds, preset.gpt.n_embd)
    except ValueError as err:
        parser.error(str(err))
    sweep = len(set(ranks)) > 1 or len(set(seeds)) > 1 or len(args.k or []) > 1
    fig_path = args.fig or (os.path.splitext(args.out)[0] + ".png" if sweep and args.out else None)
    print(f"preset {preset_name} on {device}: {len(runs)} runs")

    base_state, _ = pretrain(preset.gpt, preset.train, device, cache_dir=args.cache_dir)
    rows = []
    for method, rank, k, hybrid_r, seed in runs:
        row = finetune(base_state, method, rank, k, hybrid_r, seed=seed or 0, preset=preset, device=device)
        del row["model"]
        rows.append(row)
        print(f"{method} rank={rank} seed={seed}: val loss {row['val_loss']:.4f}, pass@1 {100 * row['pass_at_1']:.1f}%,"
              f" {row['seconds']:.1f}s")
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print()
    print(format_table(rows))
    if fig_path:
        plot_sweep(rows, fig_path)
        print(f"figure saved to {fig_path}")


if __name__ == "__main__":
    main()
