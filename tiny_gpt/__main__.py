"""`python -m tiny_gpt`: pretrain (or load) the base model, fine-tune it with each method, print a table.

    python -m tiny_gpt --preset smoke                          # the plumbing, in seconds
    python -m tiny_gpt --preset gpu --quick --bf16 on          # the gpu preset's code path, checked on a CPU
    python -m tiny_gpt                                         # the cpu preset: one rank, one seed (gpu with CUDA)
    python -m tiny_gpt --ranks 4 16 64 --seeds 0 1 2 --out results/sweep_cpu.json --fig results/sweep_cpu.png

Ranks are trainable-parameter budgets: every adapter method at rank R trains exactly as many parameters as
LoRA of rank R. GraLoRA uses r = R with k by the paper's rule; Hybrid GraLoRA puts R/2 in GraLoRA blocks and
R/2 in a plain LoRA (PEFT's semantics: the JSON row's r is the GraLoRA part, hybrid_r the LoRA part).

Usage errors (a bad device, an --out or --fig path that cannot be written, an impossible rank) stop the job
with exit status 2 before any training. If the --out file cannot be written later in the run, the rows go to
a fallback file in the current directory instead (named on stderr) and the job ends with exit status 1.
"""

import argparse
import dataclasses
import json
import os
import sys

from .report import format_table, plot_sweep
from .train import (METHODS, PRESETS, finetune, parse_device, pick_device, plan_runs, positive_float, pretrain, print_now, quick, write_json)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is long enough to hide them)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = Parser(
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
                        help="write the results as a JSON list of rows to this file, rewritten (atomically) after "
                        "every run. Its folder is created if missing; a path that cannot be written is refused "
                        "before any training.")
    parser.add_argument("--fig", default=None,
                        help="save the val-loss and pass@1 vs rank figure here (.png, .pdf, .svg, ...). Default: next "
                        "to --out as .png when the run sweeps ranks, k or seeds; otherwise no figure. Checked like "
                        "--out before any training.")
    parser.add_argument("--cache-dir", default=None,
                        help="where the pretrained base model is cached. Default: $TINY_GPT_CACHE, else "
                        ".cache/tiny_gpt in the current directory.")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="torch device, e.g. cpu or cuda:0; one this machine has. Default: cuda, then mps, "
                        "then cpu.")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast of the training forward: auto = on CUDA only; on forces it (the "
                        "CPU supports it: a way to check the gpu preset's path on a laptop); off. Val loss and "
                        "pass@1 are computed in float32 either way. Default: auto.")
    parser.add_argument("--quick", action="store_true",
                        help="a check of the preset's code path in seconds, not an experiment: 2 pretraining and "
                        "2 fine-tuning steps on batches of 2, 32 training, 4 val and 2 test tasks; the model's shapes, "
                        "learning rates and dtypes stay the preset's. Its numbers mean nothing.")
    return parser, parser.parse_args(argv)


def device_arg(text):
    """argparse type for --device: a device this machine has, else a usage error naming those it has."""
    try:
        return parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_writable(path, flag):
    """Why `path` cannot be written as a file (creating its missing folders), or None if it can.

    Run before any training, so that a typo costs seconds, not the run. The check is real: the folders are
    created and a temporary file is made and removed in the target folder.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return f"{flag} {path} is a folder, not a file"
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):  # the nearest ancestor that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{flag} {path}: {existing} is not a folder"
    if existing != folder:
        try:
            os.makedirs(folder)
        except OSError as err:
            return f"{flag} {path}: cannot create the folder {folder}: {err.strerror or err}"
        print_now(f"created folder {folder} for {flag}")
    try:
        with open(os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.check"), "w") as probe:
            pass
        os.remove(probe.name)
    except OSError as err:
        return f"{flag} {path} cannot be written: {err.strerror or err}"
    return None


def check_figure_format(path):
    """Why matplotlib cannot save a figure at `path` (its extension), or None if it can."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        what = f"{ext!r} files" if ext else "a file without an extension"
        return f"--fig {path}: matplotlib cannot write {what}; use one of {', '.join(sorted(formats))}"
    return None


class RowWriter:
    """Keeps the finished rows on disk after every run: in --out, or, once that fails, in a fallback file in the
    current directory (said on stderr). `failed` is True once any write to --out failed."""

    def __init__(self, path):
        self.path, self.failed = path, False
        self.fallback = os.path.abspath(f"tiny_gpt-rows-{os.getpid()}.json")

    def write(self, rows):
        """Write all rows; return where they are now, or None if nowhere (then print them)."""
        if not self.failed:
            try:
                write_json(self.path, rows)
                return self.path
            except OSError as err:
                self.failed = True
                print(f"tiny_gpt: cannot write --out {self.path} ({err.strerror or err}); the rows go to "
                      f"{self.fallback} instead", file=sys.stderr, flush=True)
        try:
            write_json(self.fallback, rows)
            return self.fallback
        except OSError as err:
            print(f"tiny_gpt: cannot write {self.fallback} either ({err.strerror or err}); the rows follow as JSON",
                  file=sys.stderr, flush=True)
            print(json.dumps(rows), flush=True)
            return None


def main(argv=None):
    parser, args = parse_args(argv)
    device = args.device or pick_device()
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = quick(PRESETS[preset_name]) if args.quick else PRESETS[preset_name]
    bf16 = dict(auto=None, on=True, off=False)[args.bf16]
    preset = dataclasses.replace(preset, train=dataclasses.replace(
        preset.train, bf16=bf16, lr_adapter=args.lr_adapter or preset.train.lr_adapter))
    ranks = args.ranks or preset.ranks
    seeds = args.seeds if args.seeds is not None else preset.seeds
    try:
        runs = plan_runs(args.methods, ranks, seeds, args.k, args.hybrid_r, args.hybrid_max_r, preset.gpt.n_embd)
    except ValueError as err:
        parser.error(str(err))
    sweep = len(set(ranks)) > 1 or len(set(seeds)) > 1 or len(args.k or []) > 1
    fig_path = args.fig or (os.path.splitext(args.out)[0] + ".png" if sweep and args.out else None)
    for path, flag in ((args.out, "--out"), (fig_path, "--fig")):
        problem = path and (check_writable(path, flag) or (flag == "--fig" and check_figure_format(path)))
        if problem:
            parser.error(problem)
    print_now(f"preset {preset_name}{' (quick)' if args.quick else ''} on {device}: {len(runs)} runs")

    base_state, _ = pretrain(preset.gpt, preset.train, device, cache_dir=args.cache_dir)
    rows, writer, where = [], RowWriter(args.out) if args.out else None, None
    for method, rank, k, hybrid_r, seed in runs:
        row = finetune(base_state, method, rank, k, hybrid_r, seed=seed or 0, preset=preset, device=device)
        del row["model"]
        rows.append(row)
        print_now(f"{method} rank={rank} seed={seed}: val loss {row['val_loss']:.4f}, "
                  f"pass@1 {100 * row['pass_at_1']:.1f}%, {row['seconds']:.1f}s")
        if writer:
            where = writer.write(rows)
    print_now("")
    print_now(format_table(rows))
    status = 0
    if fig_path:
        try:
            plot_sweep(rows, fig_path)
            print_now(f"figure saved to {fig_path}")
        except OSError as err:
            print(f"tiny_gpt: cannot save the figure {fig_path} ({err.strerror or err})", file=sys.stderr)
            status = 1
    if writer and writer.failed:
        print(f"tiny_gpt: the run finished, but --out {args.out} could not be written; the rows are in "
              f"{where or 'the JSON printed above'}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
