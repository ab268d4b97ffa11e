"""python -m tiny_gpt: pretrain (or load) the base model, fine-tune it with each method, print a table.

    python -m tiny_gpt --preset smoke       # the plumbing, in seconds
    python -m tiny_gpt                      # the cpu preset: one rank, one seed (the gpu preset with CUDA)
    python -m tiny_gpt --ranks 4 16 64 --seeds 0 1 2 --out results/sweep_cpu.json --fig results/sweep_cpu.png

Ranks are trainable-parameter budgets: every adapter method at rank R trains as many parameters as LoRA of rank
R. GraLoRA uses r = R, k by the paper's rule; Hybrid (at R <= 16, as in the paper) puts R/2 in GraLoRA blocks and
R/2 in a plain LoRA (a row's r and hybrid_r). Repeated values count once.

--out FILE holds {"config": the settings, "rows": one per finished run}, rewritten after every run. The same command
again skips the runs in FILE: after Ctrl-C (exit status 130) it continues where it stopped; with all runs there, it
prints the table and draws the figure. A FILE made with other settings is refused. The base model is cached in
$TINY_GPT_CACHE (default .cache/tiny_gpt). A bad device, rank, --out, --fig or cache folder stops the job before any
work (exit status 2); if FILE cannot be written mid-run, its rows are printed as JSON instead (exit status 1).
"""

import argparse
import dataclasses
import json
import math
import os
import sys

from .report import format_table, plot_sweep
from .train import (METHODS, PRESETS, adapter_spec, cache_path, finetune, parse_device, pick_device, plan_runs,
                    pretrain, print_now, write_json)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is long enough to hide them)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = Parser(prog="python -m tiny_gpt", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="experiment size: smoke (seconds, for tests), cpu (minutes on a "
        "laptop), gpu (one GPU, a bigger model). Default: gpu when the device is CUDA, else cpu.")
    add("--methods", nargs="+", choices=METHODS, default=METHODS, help="base (the pretrained model, not fine-tuned), "
        "fft (full fine-tuning), lora, gralora, hybrid. Default: all.")
    add("--ranks", nargs="+", type=int, help="rank budgets (see above) up to the model width. Default: the preset's.")
    add("--k", nargs="+", type=int, help="GraLoRA blocks per side; several values sweep k. Default: the paper's "
        "rule, k = 2 for a GraLoRA rank below 64, else 4.")
    add("--hybrid-r", type=int, help="rank of Hybrid's plain-LoRA part (GraLoRA gets the rest). Default: half.")
    add("--seeds", nargs="+", type=int, help="fine-tuning seeds (adapter init and batch order); several give "
        "mean ± std. Default: the preset's.")
    add("--lr-adapter", type=float, help="peak learning rate of LoRA, GraLoRA and Hybrid. Default: the preset's.")
    add("--out", help="JSON file of the results, rewritten after every run (see above); its folder is made if missing.")
    add("--fig", help="the val-loss and pass@1 vs rank figure (.png, .pdf, .svg, ...). Default: next to --out as "
        ".png when the run sweeps ranks, k or seeds.")
    add("--device", help="torch device this machine has, e.g. cpu or cuda:0. Default: cuda, then mps, then cpu.")
    return parser, parser.parse_args(argv)


def check_folder(folder, what):
    """Create `folder` if missing; ValueError naming `what` if it cannot hold new files."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what}: {folder} is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what}: cannot create the folder {folder} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what}: the folder {folder} is not writable")


def check_file(path, flag):
    """ValueError if `path` (given as `flag`) cannot be written as a file; its folder is created if missing."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder, not a file")
    check_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")
    if flag == "--fig":
        from matplotlib.backend_bases import FigureCanvasBase
        ext, formats = os.path.splitext(path)[1].lstrip(".").lower(), FigureCanvasBase.get_supported_filetypes()
        if ext not in formats:
            what = f"{ext!r} files" if ext else "a file without an extension"
            raise ValueError(f"--fig {path}: matplotlib cannot write {what}; use one of {', '.join(sorted(formats))}")


def read_rows(path, config):
    """The rows already in --out `path` ([] if none); ValueError if it holds other settings."""
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            doc = json.load(f)
        stored, rows = doc["config"], doc["rows"]
        [row_key(row) for row in rows], stored.items()  # every row keyed as the runs are, the settings a dict
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--out {path} is not a results file of python -m tiny_gpt ({type(err).__name__}: "
                         f"{err}); use another --out") from None
    changed = [f"{key}={stored.get(key)} there, {config.get(key)} here"
               for key in sorted(config.keys() | stored.keys()) if stored.get(key) != config.get(key)]
    if changed:
        raise ValueError(f"--out {path} was made with other settings ({'; '.join(changed)}); use another --out")
    return rows


def run_key(method, rank, k, hybrid_r, seed, width):
    """(method, r, k, hybrid_r, seed) of a planned run, as its row will hold them."""
    spec = adapter_spec(method, rank, k, hybrid_r, width) if rank is not None else (None, None, None)
    return (method, *spec, seed)


def row_key(row):
    return tuple(row[key] for key in ("method", "r", "k", "hybrid_r", "seed"))


def plan(args):
    """The device, the preset's name, the preset with the command line's changes, the runs asked for (keyed as
    their rows will be) and the figure's path; ValueError on a bad value or a path that cannot be written."""
    device = parse_device(args.device) if args.device else pick_device()
    if args.lr_adapter is not None and not 0 < args.lr_adapter < math.inf:
        raise ValueError(f"--lr-adapter must be a positive finite number, got {args.lr_adapter}")
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    preset = dataclasses.replace(preset, train=dataclasses.replace(
        preset.train, lr_adapter=args.lr_adapter or preset.train.lr_adapter,
        bf16=device.type == "cuda" if preset.train.bf16 is None else preset.train.bf16))
    ranks, seeds, width = args.ranks or preset.ranks, args.seeds or preset.seeds, preset.gpt.n_embd
    runs = plan_runs(args.methods, ranks, seeds, args.k, args.hybrid_r, width=width)
    if not runs:  # hybrid alone, at ranks above 16
        raise ValueError(f"no run to do: hybrid runs only at ranks up to 16 (as in the paper), got --ranks {ranks}")
    sweep = len(set(ranks)) > 1 or len(set(seeds)) > 1 or len(set(args.k or [])) > 1
    fig = args.fig or (os.path.splitext(args.out)[0] + ".png" if sweep and args.out else None)
    for path, flag in ((args.out, "--out"), (fig, "--fig")):
        if path:
            check_file(path, flag)
    return device, name, preset, {run_key(*run, width): run for run in runs}, fig


def save(path, doc):
    """Write `doc` to --out `path`; if that fails, print it as JSON so that no finished row is lost, and exit 1."""
    try:
        write_json(path, doc)
    except OSError as err:
        print(json.dumps(doc), flush=True)
        print(f"tiny_gpt: cannot write --out {path} ({err.strerror or err}); its {len(doc['rows'])} rows are "
              "printed above as JSON", file=sys.stderr)
        sys.exit(1)


def run_all(runs, doc, preset, device, out):
    """Pretrain (or load) the base model, then fine-tune each run, adding its row to doc and saving doc to `out`."""
    base_state, _ = pretrain(preset.gpt, preset.train, device)
    for method, rank, k, hybrid_r, seed in runs:
        row = finetune(base_state, method, rank, k, hybrid_r, seed=seed or 0, preset=preset, device=device)
        del row["model"]
        if out:
            save(out, dict(doc, rows=doc["rows"] + [row]))
        doc["rows"].append(row)  # after the save: doc holds what --out holds
        result = ("diverged: the loss became NaN or infinite" if row["diverged"] else
                  f"val loss {row['val_loss']:.4f}, pass@1 {100 * row['pass_at_1']:.1f}%")
        print_now(f"{method} rank={rank} seed={seed}: {result}, {row['seconds']:.1f}s")


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        device, name, preset, runs, fig = plan(args)
        config = {**dataclasses.asdict(preset.gpt), **dataclasses.asdict(preset.train)}
        doc = dict(config=config, rows=read_rows(args.out, config))
        todo = [run for key, run in runs.items() if key not in {row_key(row) for row in doc["rows"]}]
        if todo:
            check_folder(os.path.dirname(cache_path(preset.gpt, preset.train)),
                         "the base model's cache ($TINY_GPT_CACHE)")
    except ValueError as err:
        parser.error(str(err))
    repeated = [f"--{flag} {' '.join(map(str, v))}" for flag, v in (("ranks", args.ranks), ("seeds", args.seeds),
                                                                     ("k", args.k)) if v and len(set(v)) < len(v)]
    done = f", {len(runs) - len(todo)} of them already in {args.out}" if len(todo) < len(runs) else ""
    print_now(f"preset {name} on {device}: {len(runs)} run{'s' * (len(runs) != 1)}{done}"
              + (f" (repeated values count once: {'; '.join(repeated)})" if repeated else ""))
    try:
        if todo:
            run_all(todo, doc, preset, device, args.out)
    except KeyboardInterrupt:
        kept = (f"the {len(doc['rows'])} finished runs are in {args.out}; the same command continues from there"
                if args.out and doc["rows"] else f"no run had finished, so {args.out} was not written" if args.out
                else "nothing was saved (no --out); with --out FILE the finished runs are kept")
        print(f"\ntiny_gpt: interrupted; {kept}", file=sys.stderr, flush=True)
        return 130
    rows = {row_key(row): row for row in doc["rows"]}
    rows = [rows[key] for key in runs]
    print_now("\n" + format_table(rows))
    if fig:
        plot_sweep(rows, fig)
        print_now(f"figure saved to {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
