"""Outlier input channels and gradient entanglement: the paper's causal story, tested on the tiny GPT.

GraLoRA's motivation (Jung et al., arXiv 2505.20355, Sec. 3.2-3.3) is a mechanism, not just a score:

  1. Large LLMs have a few input channels whose activations are orders of magnitude larger than the rest
     (paper Fig. 3a).
  2. FFT's weight gradient is G = dL/dW = dY^T X (M, N): an outlier input channel c only inflates column c.
  3. LoRA's factors see G through each other. One SGD step of size lr on A and B changes dW = scaling B A by,
     to first order in lr (paper Eq. 4 and the text around it),

         dW_step = -lr * scaling^2 * (G A^T A  +  B B^T G)                                   (LoRA)

     The term G A^T A mixes the columns of G: the outlier's column c leaks into EVERY input column
     through row c of A^T A ("gradient entanglement").
  4. GraLoRA's blocks each see their own slice of G, so the same step changes block (i, j) by

         dW_step[i, j] = -lr * scaling^2 * (G_ij A_ij^T A_ij  +  B_ij B_ij^T G_ij)      (GraLoRA)

     and the outlier's column can only leak into the other columns of ITS input slice (N/k columns,
     not N). Hybrid GraLoRA adds the LoRA formula for its plain-LoRA part.

Tiny models trained for minutes do not grow such outliers, so this module can plant one, without changing
the function the base model computes: multiply a LayerNorm's gain and bias on one channel by a factor (`scale`)
and divide the matching input column of the Linear it feeds by it. The adapters then see an input channel `scale`
times larger, as in a large LLM, while the base model's logits stay the same.

What is here:
  * channel_rms / rms_summary / plot_channel_rms: measure per-input-channel magnitude (Fig. 3a in miniature);
  * plant_outlier / plant_outliers: the function-preserving plant;
  * induced_update / deviation / outlier_leak / gradient_deviation / gradient_study: the first-order update each
    method makes from a batch's FFT gradient, and how far (and where) it deviates from FFT's (Fig. 3b-c and 6
    in miniature);
  * plan_study / finetune_study / finetune_table: LoRA, GraLoRA, Hybrid and FFT fine-tuned on the toy task with
    and without outliers, most important runs first, resumable;
  * load_studies / lr_table / plot_lr_comparison: the same study at several adapter learning rates, to tell
    entanglement from a too-large step;
  * a command line that runs the whole study:  python -m study.outliers --help

Shapes: B batch, T tokens, N in_features, M out_features, r rank, k blocks per side, n = N/k, m = M/k,
s = r/k the rank of one block (as in gralora.py). The LoRA factor alpha / r is `scaling`, and the planted
outlier's factor is `scale` (written x10, x100 in tables and prose).
"""

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import gralora
from gralora import AdapterLinear, GraLoRALinear, LoRALinear

from tiny_gpt.data import CharTokenizer, make_corpus
from tiny_gpt.model import GPT
from tiny_gpt.report import METHOD_COLORS, mean_std
from tiny_gpt.train import (TARGETS, adapter_spec, collate, encode_tasks, finetune, get_preset, pick_device,
                            plan_runs, pretrain, tasks_for, write_json)

# The Linear layers adapters go on, named as in GPT-2, and the LayerNorm that feeds each of the two that read a
# LayerNorm's output directly. Only those two can get a function-preserving planted outlier: attn.c_proj reads
# the attention output and mlp.c_proj reads GELU(c_fc(x)), and GELU(a z) != a GELU(z).
ADAPTED = tuple(TARGETS)  # the core's list: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
FED_BY = {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}
LAYER_GROUPS = {"planted": tuple(FED_BY), "control": ("attn.c_proj", "mlp.c_proj")}  # gradient_study's averages


# ---------------------------------------------------------------------------------------------------------
# 1. Measure: per-input-channel RMS of every adapted Linear (paper Fig. 3a)
# ---------------------------------------------------------------------------------------------------------


def adapted_linears(model):
    """(name, module) of every attention / MLP Linear adapters go on, wrapped in an adapter or not."""
    inside = {f"{name}.base" for name, mod in model.named_modules() if isinstance(mod, AdapterLinear)}
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, AdapterLinear)) and name not in inside
            and any(name.endswith(suffix) for suffix in ADAPTED)]


@torch.no_grad()
def channel_rms(model, idx):
    """Root-mean-square of each input channel of every adapted Linear, over all tokens of a batch.

    Args:
        model: a tiny_gpt GPT (adapters in place or not).
        idx: (B, T) token ids.

    Returns:
        {layer name: (N,) tensor}, rms[c] = sqrt(mean over the B*T tokens of x[..., c]^2).
    """
    rms, hooks = {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()  # (B, T, N)
            rms[name] = x.pow(2).reshape(-1, x.shape[-1]).mean(dim=0).sqrt().float()  # (N,)
        return record

    for name, module in adapted_linears(model):
        hooks.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rms


def rms_summary(rms):
    """Per layer: the largest channel RMS, the median one, their ratio, and which channel is largest.
    A ratio near 1-3 is a model without outliers; the paper's LLaMA layers reach ratios in the hundreds."""
    out = {}
    for name, values in rms.items():
        median = values.median().item()
        out[name] = dict(max=values.max().item(), median=median, ratio=values.max().item() / max(median, 1e-12),
                         argmax=int(values.argmax()))
    return out


def plot_channel_rms(rms_before, rms_after, layer, path):
    """Two panels: one layer's channel RMS before / after planting, and max/median per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax0.plot(rms_after[layer].numpy(), lw=1.5, color="C1", label="outlier planted")
    ax0.plot(rms_before[layer].numpy(), lw=1, ls="--", color="C0", label="base model")
    ax0.set_yscale("log")
    ax0.set(xlabel="input channel", ylabel="RMS over tokens", title=f"input of {layer}")
    ax0.legend()
    names = list(rms_before)
    short = [n.replace("transformer.h.", "h") for n in names]
    pos = range(len(names))
    ax1.bar([p - 0.2 for p in pos], [rms_summary(rms_before)[n]["ratio"] for n in names], 0.4, label="base")
    ax1.bar([p + 0.2 for p in pos], [rms_summary(rms_after)[n]["ratio"] for n in names], 0.4, label="planted")
    ax1.set_yscale("log")
    ax1.set_xticks(list(pos), short, rotation=70, fontsize=7)
    ax1.set(ylabel="max / median channel RMS", title="every adapted layer")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# 2. Plant: a function-preserving outlier input channel
# ---------------------------------------------------------------------------------------------------------


def plant_outlier(model, layer, channel, scale):
    """Give `layer` (an attn.c_attn or mlp.c_fc Linear) an input channel `scale` times larger, without
    changing what the model computes.

    A pre-LayerNorm block computes ln(x) = w * (x - mean) / std + b, then feeds it to one Linear. With
    w[c], b[c] multiplied by `scale` = a, channel c of ln(x) is a times larger; with column c of the Linear's
    weight divided by a, the Linear's output is exactly what it was:

        W' ln'(x) = sum_{c' != c} W[:, c'] ln(x)_c'  +  (W[:, c] / a) (a ln(x)_c)  =  W ln(x)

    Args:
        model: a tiny_gpt GPT without adapters on `layer` (plant first, then add adapters).
        layer: module name, e.g. "transformer.h.1.mlp.c_fc" or "transformer.h.0.attn.c_attn".
        channel: input channel index, 0 <= channel < in_features.
        scale: a > 0, finite. 1 changes nothing.
    """
    names = dict(model.named_modules())
    if layer not in names:
        raise ValueError(f"no module named layer={layer!r}; plantable layers are {plantable_layers(model)}")
    suffix = next((sfx for sfx in FED_BY if layer.endswith(sfx)), None)
    if suffix is None:
        raise ValueError(f"layer={layer!r} is not fed by a LayerNorm; plantable layers are {plantable_layers(model)}")
    linear = names[layer]
    if isinstance(linear, AdapterLinear):
        raise ValueError(f"layer={layer!r} already has an adapter; plant outliers in the base model first")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got scale={scale!r}")
    N = linear.in_features
    if not isinstance(channel, int) or not 0 <= channel < N:
        raise ValueError(f"channel must be an integer in [0, {N}) for {layer} (in_features={N}), "
                         f"got channel={channel!r}")
    block = names[layer[: -len(suffix) - 1]]
    ln = getattr(block, FED_BY[suffix])
    if ln.weight is None:
        raise ValueError(f"the LayerNorm feeding {layer} has no gain to scale (elementwise_affine=False)")
    with torch.no_grad():
        ln.weight[channel] *= scale
        if ln.bias is not None:
            ln.bias[channel] *= scale
        linear.weight[:, channel] /= scale  # (M,) column c


def plantable_layers(model):
    """Names of the layers plant_outlier accepts: every block's attn.c_attn and mlp.c_fc."""
    return [name for name, _ in adapted_linears(model) if any(name.endswith(sfx) for sfx in FED_BY)]


def plant_outliers(model, scale, channel=0, layers=None):
    """plant_outlier on `layers` (default: every attn.c_attn and mlp.c_fc) at the same `channel`, the way
    massive activations in LLMs sit in the same residual dimension layer after layer. Returns the names."""
    layers = plantable_layers(model) if layers is None else list(layers)
    for layer in layers:
        plant_outlier(model, layer, channel, scale)
    return layers


# ---------------------------------------------------------------------------------------------------------
# 3. Gradient deviation: the update each method induces from FFT's gradient (paper Sec. 3.2-3.3, Eq. 4)
# ---------------------------------------------------------------------------------------------------------


def _lora_direction(G, A, B):
    """G A^T A + B B^T G for one LoRA (or one block): A (r, N), B (M, r), G (M, N) -> (M, N)."""
    return G @ A.t() @ A + B @ (B.t() @ G)


def induced_update(layer, G, lr=1.0):
    """The change of layer.delta_weight() after one SGD step of size lr on the adapter's factors, to first
    order in lr, when the loss's gradient with respect to the layer's weight is G (FFT's gradient).

    Why: with dW = c B A (c = scaling), the chain rule gives dL/dB = c G A^T and dL/dA = c B^T G, so the step
    changes dW by  c (B - lr c G A^T)(A - lr c B^T G) - c B A = -lr c^2 (G A^T A + B B^T G) + O(lr^2).
    GraLoRA applies this per block (i, j) with G_ij, A_ij, B_ij, plus the LoRA formula for its hybrid part.
    FFT's own step is -lr G; compare the two with deviation().

    Args:
        layer: a LoRALinear or GraLoRALinear.
        G: (M, N) dL/dW, e.g. the .grad of layer.base.weight.

    Returns:
        (M, N) tensor in G's dtype.
    """
    dtype = G.dtype
    if isinstance(layer, LoRALinear):
        D = _lora_direction(G, layer.A.detach().to(dtype), layer.B.detach().to(dtype))  # (M, N)
    elif isinstance(layer, GraLoRALinear):
        k = layer.k
        M, N = G.shape
        A, B = layer.A.detach().to(dtype), layer.B.detach().to(dtype)  # (k, k, s, n), (k, k, m, s)
        G_blocks = G.reshape(k, M // k, k, N // k).permute(0, 2, 1, 3)  # (k, k, m, n): G_blocks[i, j] = G_ij
        GAt = torch.einsum("ijmn,ijrn->ijmr", G_blocks, A)  # (k, k, m, s): G_ij A_ij^T
        GAtA = torch.einsum("ijmr,ijrn->ijmn", GAt, A)  # (k, k, m, n): G_ij A_ij^T A_ij
        BtG = torch.einsum("ijmr,ijmn->ijrn", B, G_blocks)  # (k, k, s, n): B_ij^T G_ij
        BBtG = torch.einsum("ijmr,ijrn->ijmn", B, BtG)  # (k, k, m, n): B_ij B_ij^T G_ij
        D = (GAtA + BBtG).permute(0, 2, 1, 3).reshape(M, N)  # (M, N): row block i, column block j
        if layer.hybrid_r > 0:
            D = D + _lora_direction(G, layer.hybrid_A.detach().to(dtype), layer.hybrid_B.detach().to(dtype))
    else:
        raise ValueError(f"layer must be a LoRALinear or GraLoRALinear, got {type(layer).__name__}")
    return -lr * layer.scaling**2 * D


def deviation(G, update, columns=None):
    """1 - cosine between FFT's update direction (-G) and an induced update, optionally on some columns only.
    0: the adapter moves dW exactly like FFT would (up to step size); 1: orthogonal to it."""
    if columns is not None:
        G, update = G[:, columns], update[:, columns]
    cos = torch.nn.functional.cosine_similarity(-G.flatten(), update.flatten(), dim=0, eps=1e-30)
    return 1.0 - cos.item()


def outlier_leak(layer, G, channel):
    """Where the outlier column's share of the update lands.

    induced_update is linear in G, so it splits exactly into the part made by G's column `channel` alone
    (the outlier part) and the part made by every other column (the rest). FFT puts the outlier part in
    column `channel` only; LoRA spreads it over all N columns, GraLoRA over the N/k columns of its slice.

    Returns a dict:
        leak_share: share of the outlier part's energy (squared norm) outside column `channel`;
        columns_touched: share of the other N - 1 columns the outlier part reaches at all;
        columns_swamped: share of the other columns where the outlier part is larger than the rest
            (those channels' own update is drowned by the outlier's).
    """
    G_out = torch.zeros_like(G)
    G_out[:, channel] = G[:, channel]  # (M, N): the outlier column alone
    U_out = induced_update(layer, G_out)  # (M, N)
    U_rest = induced_update(layer, G - G_out)  # (M, N)
    others = [c for c in range(G.shape[1]) if c != channel]
    leak = U_out[:, others].norm(dim=0)  # (N-1,) per-column norm of the outlier's leak
    rest = U_rest[:, others].norm(dim=0)  # (N-1,)
    total = U_out.pow(2).sum().item()
    tiny = 1e-12 * U_out.abs().max().item()
    return dict(
        leak_share=U_out[:, others].pow(2).sum().item() / total if total > 0 else 0.0,
        columns_touched=(leak > tiny * math.sqrt(G.shape[0])).double().mean().item(),
        columns_swamped=(leak > rest).double().mean().item(),
    )


def fft_gradients(model, idx, targets):
    """G = dL/dW (M, N) of every adapted layer's frozen base weight, at the model's current state."""
    layers = gralora.adapter_layers(model)
    for _, layer in layers:
        layer.base.weight.requires_grad_(True)
        layer.base.weight.grad = None
    try:
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        return {name: layer.base.weight.grad.detach().clone() for name, layer in layers}
    finally:
        for _, layer in layers:
            layer.base.weight.requires_grad_(False)
            layer.base.weight.grad = None
        model.zero_grad(set_to_none=True)


def gradient_deviation(base, batches, method, r, k=2, hybrid_r=0, seed=0, channel=0, train_steps=0, lr=1e-3):
    """Deviation of each adapted layer's induced update from FFT's gradient on one fine-tuning batch.

    Args:
        base: the base GPT (outliers planted or not); it is copied, not changed.
        batches: list of (idx, targets) pairs; the last one is measured, the others (train_steps of them,
            cycled) train the adapters first with AdamW, so B != 0 (the init has B = 0).
        method: "lora" or "gralora" (hybrid when hybrid_r > 0).
        r, k, hybrid_r: adapter shape, as in gralora.add_adapters.
        seed: seeds the adapter init.
        channel: the (planted) outlier channel, left out of the "other columns" measures.

    Returns:
        a list of dicts, one per adapted layer, with deviation (all columns), deviation_others (every column
        but `channel`) and outlier_leak()'s measures.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    gralora.add_adapters(model, list(ADAPTED), method=method, r=r, k=k, hybrid_r=hybrid_r)
    if train_steps:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        model.train()
        for step in range(train_steps):
            idx, targets = batches[step % max(1, len(batches) - 1)]
            _, loss = model(idx, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    idx, targets = batches[-1]
    grads = fft_gradients(model, idx, targets)
    rows = []
    for name, layer in gralora.adapter_layers(model):
        G = grads[name].double()  # (M, N)
        U = induced_update(layer, G)  # (M, N)
        others = [c for c in range(G.shape[1]) if c != channel]
        rows.append(dict(layer=name, deviation=deviation(G, U), deviation_others=deviation(G, U, others),
                         **outlier_leak(layer, G, channel)))
    return rows


def planted_state(base_state, gpt_cfg, scale, channel=0):
    """A pretrained state dict with outliers planted in every block (plant_outliers), ready to hand to
    tiny_gpt.train.finetune as its base_state. scale = 1 returns base_state itself."""
    if scale == 1:
        return base_state
    model = GPT(gpt_cfg)
    model.load_state_dict(base_state)
    plant_outliers(model, scale, channel)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}



def gradient_study(base_state, gpt_cfg, batches, ranks, scales, seeds, channel=0, train_steps=(0,), lr=1e-2,
                   log=print):
    """gradient_deviation over outlier scales x adapter states x ranks x methods x seeds.

    The adapter state is the init (train_steps = 0, B = 0) or after a few AdamW steps (B != 0). Each
    configuration gives two rows: the mean over the layers the outlier is planted in (every attn.c_attn and
    mlp.c_fc, layers="planted"), and the mean over the others (attn.c_proj, mlp.c_proj: no outlier, a control).
    """
    rows, bases = [], {}
    for scale, steps, rank, method, seed in itertools.product(scales, train_steps, ranks, ("lora", "gralora"), seeds):
        if scale not in bases:
            bases[scale] = GPT(gpt_cfg)
            bases[scale].load_state_dict(planted_state(base_state, gpt_cfg, scale, channel))
        r, k, hybrid_r = adapter_spec(method, rank, width=gpt_cfg.n_embd)
        start = time.time()
        per_layer = gradient_deviation(bases[scale], batches[:steps] + batches[-1:], method, r, k, hybrid_r, seed,
                                       channel, train_steps=steps, lr=lr)
        config = dict(method=method, r=r, k=k, seed=seed, outlier_scale=scale, train_steps=steps)
        planted, control = (layer_group_mean(per_layer, group, config) for group in LAYER_GROUPS)
        rows += [planted, control]
        log(f"gradients x{scale:g} steps={steps} {method} r={r} k={k} seed={seed}: deviation "
            f"{planted['deviation']:.3f}, others {planted['deviation_others']:.3f}, "
            f"swamped {planted['columns_swamped']:.2f} ({time.time() - start:.1f}s)")
    return rows


def layer_group_mean(per_layer, group, config):
    """One gradient_study row: `config`, then each measure of gradient_deviation averaged over the layers of
    LAYER_GROUPS[group]."""
    chosen = [row for row in per_layer if row["layer"].endswith(LAYER_GROUPS[group])]
    row = dict(config, layers=group)
    for key in ("deviation", "deviation_others", "leak_share", "columns_touched", "columns_swamped"):
        row[key] = statistics.fmean(x[key] for x in chosen)
    return row


def group_stats(rows, keys, values):
    """Group rows by `keys`; for each value: mean, std and SE over the group, and n. Returns a list of flat
    dicts (value, value_std, value_se). (tiny_gpt.report.summarize is the sweep table's fixed grouping.)"""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    out = []
    for key, group in groups.items():
        entry = dict(zip(keys, key), n=len(group))
        for value in values:
            xs = [row[value] for row in group if row.get(value) is not None]
            if xs:
                entry[value], entry[value + "_std"] = mean_std(xs)
                entry[value + "_se"] = entry[value + "_std"] / math.sqrt(len(xs))
        out.append(entry)
    return out


def plot_gradient_study(rows, path):
    """Deviation from FFT's gradient vs rank, LoRA and GraLoRA, with and without the planted outlier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["layers"] == "planted"]
    panels = [("deviation", "1 - cos(update, FFT), all columns"),
              ("deviation_others", "1 - cos, all but the outlier column"),
              ("columns_swamped", "share of other columns swamped by\nthe outlier's leak")]
    states = sorted({row["train_steps"] for row in rows})
    fig, axes = plt.subplots(len(states), len(panels), figsize=(4.2 * len(panels), 3.3 * len(states)), squeeze=False)
    scales = sorted({row["outlier_scale"] for row in rows})
    summaries = {steps: group_stats([row for row in rows if row["train_steps"] == steps],
                                    ("method", "outlier_scale", "r"), [p for p, _ in panels]) for steps in states}
    styles = dict(zip(scales, itertools.cycle(("--", "-", ":"))))
    for (si, steps), (pi, (value, title)) in itertools.product(enumerate(states), enumerate(panels)):
        ax = axes[si][pi]
        for method, scale in itertools.product(("lora", "gralora"), scales):
            pts = sorted((e["r"], e[value], e[value + "_std"]) for e in summaries[steps]
                         if e["method"] == method and e["outlier_scale"] == scale)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], ls=styles[scale],
                        marker="o", ms=3, capsize=2, color=METHOD_COLORS[method], label=f"{method}, outlier x{scale:g}")
        ax.set_xscale("log", base=2)
        state = f"adapters after {steps} AdamW steps" if steps else "adapters at init (B = 0)"
        ax.set(xlabel="rank r", title=f"{title}\n{state}")
        if si == 0 and pi == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# 4. Fine-tuning with and without planted outliers
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def completion_loss_se(model, examples, device, batch_size=64):
    """The per-character completion loss over `examples` (as train.completion_loss computes it) and its
    standard error over tasks: a ratio of sums, L = sum_i l_i / sum_i n_i, so by the delta method
    SE = sqrt(sum_i (l_i - L n_i)^2 * n / (n - 1)) / sum_i n_i, with l_i the summed loss of task i."""

    model.eval()
    sums, counts = [], []
    for start in range(0, len(examples), batch_size):
        x, y = collate(examples[start : start + batch_size], device)  # (B, T), (B, T)
        logits, _ = model(x)  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)
        sums += nll.sum(dim=1).tolist()
        counts += (y != -1).sum(dim=1).tolist()
    n, total = len(sums), sum(counts)
    L = sum(sums) / total
    se = math.sqrt(sum((l - L * c) ** 2 for l, c in zip(sums, counts)) * n / max(1, n - 1)) / total
    return L, se


STUDY_METHODS = ("lora", "gralora", "fft", "hybrid")


def plan_study(methods, ranks, scales, seeds, width=None):
    """Every fine-tuning run of the study as (method, rank, outlier_scale, seed), most important first.

    The runs are tiny_gpt.train.plan_runs' at every outlier scale, so they are checked the same way before
    anything trains (a ValueError names an impossible rank for the model `width`), and Hybrid runs at
    ranks up to 16 only, as the paper uses it. FFT has no rank (None). Sorted by `priority`.
    """
    runs = [(method, rank, scale, seed)
            for (method, rank, _, _, seed), scale in itertools.product(plan_runs(methods, ranks, seeds, width=width),
                                                                       scales)]
    return sorted(runs, key=priority(ranks, scales))


def priority(ranks, scales):
    """Sort key of study runs, so that a study stopped by its time budget has the most telling comparisons:
      0. LoRA and GraLoRA at the smallest and largest rank, without and with the largest outlier;
      1. FFT at those two outlier scales;
      2. LoRA and GraLoRA at the other ranks, at those two scales;
      3. the other outlier scales (LoRA, GraLoRA and FFT);
      4. Hybrid.
    Within a tier: by outlier scale, rank, method (as in STUDY_METHODS), then seed."""
    end_ranks, end_scales = {min(ranks), max(ranks)}, {min(scales), max(scales)}

    def key(run):
        method, rank, scale, seed = run
        if method == "hybrid":
            tier = 4
        elif scale not in end_scales:
            tier = 3
        elif method == "fft":
            tier = 1
        else:
            tier = 0 if rank in end_ranks else 2
        return tier, scale, rank or 0, STUDY_METHODS.index(method), seed

    return key


def pending_runs(runs, out_path):
    """The runs of `runs` that `out_path` does not hold yet (all of them if the file does not exist)."""
    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    done = {(row["method"], row["rank_budget"], row["outlier_scale"], row["seed"]) for row in rows}
    return [run for run in runs if run not in done]


def finetune_study(base_state, preset, runs, out_path, channel=0, device="cpu", max_minutes=None, log=print):
    """Fine-tune every (method, rank, outlier_scale, seed) in `runs` and append one JSON row per run to
    `out_path` as soon as it finishes (rows already in the file are kept and not run again, so a stopped
    study resumes). Stops starting new runs once `max_minutes` have passed. Returns all rows."""

    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    for row in rows:  # one file, one learning rate per method: resuming must not mix them
        if "lr" not in row:
            raise ValueError(f"{out_path} has a {row['method']} row that records no lr; add the rate it was "
                             f"trained with to every row, or choose another --out")
        if row["lr"] != preset.train.lr_for(row["method"]):
            raise ValueError(f"{out_path} holds a {row['method']} row trained with lr={row['lr']}, but this "
                             f"study runs lr={preset.train.lr_for(row['method'])}; choose another --out")
    todo = pending_runs(runs, out_path)
    val_examples = encode_tasks(tasks_for(preset.train).val, CharTokenizer())
    states, start = {}, time.time()
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already in {out_path}; {len(todo)} to go")
    for i, (method, rank, scale, seed) in enumerate(todo):
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            log(f"time budget of {max_minutes} min spent; {len(todo) - i} runs not started")
            break
        if scale not in states:
            states[scale] = planted_state(base_state, preset.gpt, scale, channel)
        t0 = time.time()
        result = finetune(states[scale], method, rank, seed=seed, preset=preset, device=device, log=lambda s: None)
        row = study_row(result, method, rank, scale, seed, val_examples, preset.train.n_test, device)
        rows.append(row)
        write_json(out_path, rows)
        scores = ("training diverged" if row.get("diverged") else
                  f"val {row['val_loss']:.4f} +- {row['val_loss_se']:.4f}, "
                  f"pass@1 {100 * row['pass_at_1']:.1f} +- {100 * row['pass_at_1_se']:.1f} %")
        log(f"[{i + 1}/{len(todo)}] {method} rank={rank} outlier x{scale:g} seed={seed}: {scores} | "
            f"train {result['seconds']:.0f}s, total {time.time() - t0:.0f}s, "
            f"elapsed {(time.time() - start) / 60:.1f} min")
    return rows


def study_row(result, method, rank, scale, seed, val_examples, n_test, device):
    """The JSON row of one run from tiny_gpt.train.finetune's result: val loss with its standard error over
    tasks, pass@1 with its binomial standard error. A run whose training loss turned non-finite has
    diverged=True and no scores (val_loss, pass_at_1 and their errors are None); the tables leave it out and
    say so."""
    model = result.pop("model")
    diverged = bool(result.get("diverged"))
    val_loss, val_loss_se = (None, None) if diverged else completion_loss_se(model, val_examples, device)
    p = None if diverged else result["pass_at_1"]
    final = result["curve"][-1][1] if result["curve"] else None
    row = dict(method=method, r=result["r"], k=result["k"], hybrid_r=result["hybrid_r"], seed=seed,
               outlier_scale=scale, lr=result["lr"], trainable_params=result["trainable_params"],
               val_loss=val_loss, val_loss_se=val_loss_se,
               pass_at_1=p, pass_at_1_se=None if p is None else math.sqrt(p * (1 - p) / n_test),
               seconds=result["seconds"], rank_budget=rank, n_val=len(val_examples), n_test=n_test,
               final_train_loss=final if final is not None and math.isfinite(final) else None)
    if diverged:
        row["diverged"] = True
    return row


def scored(rows):
    """The rows that have scores: every row but those of runs whose training diverged."""
    return [row for row in rows if not row.get("diverged")]


def diverged_note(rows):
    """Table lines naming the runs among `rows` whose training diverged (none: no lines)."""
    runs = [f"{row['method']} rank={row['rank_budget']} x{row['outlier_scale']:g} lr={row['lr']:g} seed={row['seed']}"
            for row in rows if row.get("diverged")]
    return ["", "training diverged (loss not finite), left out above: " + ", ".join(runs)] if runs else []


def finetune_table(rows):
    """The table of one study file (one learning rate per method): mean +- std over seeds, the standard error
    of that mean (std / sqrt(n)), and the mean within-run sampling error of the held-out sets; then GraLoRA -
    LoRA and Hybrid - GraLoRA paired by seed. lr_table compares files run at different learning rates."""
    all_rows, rows = rows, scored(rows)
    lines = [f"{'method':<9}{'rank':>5}{'k':>3}{'outlier':>8}{'n':>3}  {'val loss mean+-std (SE)':<28}"
             f"{'pass@1 mean+-std (SE)':<26}{'held-out SE':<18}{'params':>8}{'sec':>6}"]
    summary = group_stats(rows, ("method", "rank_budget", "outlier_scale"),
                          ["val_loss", "pass_at_1", "val_loss_se", "pass_at_1_se", "seconds", "trainable_params"])
    order = {"fft": 0, "lora": 1, "gralora": 2, "hybrid": 3}
    summary.sort(key=lambda e: (e["outlier_scale"], order[e["method"]], e["rank_budget"] or 0))
    ks = {(row["method"], row["rank_budget"]): row["k"] for row in rows}
    for e in summary:
        k = ks[(e["method"], e["rank_budget"])]
        lines.append(
            f"{e['method']:<9}{e['rank_budget'] or '-':>5}{k or '-':>3}{'x%g' % e['outlier_scale']:>8}{e['n']:>3}  "
            f"{e['val_loss']:.4f}+-{e['val_loss_std']:.4f} ({e['val_loss_std'] / math.sqrt(e['n']):.4f})   "
            f"{100 * e['pass_at_1']:5.1f}+-{100 * e['pass_at_1_std']:.1f} "
            f"({100 * e['pass_at_1_std'] / math.sqrt(e['n']):.1f})      {e['val_loss_se']:.4f} / "
            f"{100 * e['pass_at_1_se']:.1f}    {e['trainable_params']:>8.0f}{e['seconds']:>6.0f}")
    for method, baseline in (("gralora", "lora"), ("hybrid", "gralora")):
        diffs = paired_differences(rows, method, baseline)
        if diffs:
            lines += ["", f"{method} - {baseline}, paired by seed (same batches, same base): mean +- SE over seeds"]
        for (lr, scale, rank), e in sorted(diffs.items()):
            lines.append(f"  x{scale:<5g} rank={rank:<4} n={e['n']}: val loss {e['val_loss']:+.4f} +- "
                         f"{e['val_loss_se']:.4f}   pass@1 {100 * e['pass_at_1']:+.1f} +- "
                         f"{100 * e['pass_at_1_se']:.1f} points")
    lines += diverged_note(all_rows)
    return "\n".join(lines)


def paired_differences(rows, method="gralora", baseline="lora"):
    """`method` minus `baseline`, paired by seed (the same batches and base model), for every (lr, outlier_scale,
    rank_budget) where both ran: {key: dict(n, val_loss, val_loss_se, pass_at_1, pass_at_1_se)}, the mean
    difference and its standard error over seeds."""
    rows = scored(rows)
    by_key = {(row["method"], row.get("lr"), row["outlier_scale"], row["rank_budget"], row["seed"]): row
              for row in rows}
    pairs = {}
    for (name, lr, scale, rank, seed), base_row in by_key.items():
        row = by_key.get((method, lr, scale, rank, seed))
        if name == baseline and row:
            pairs.setdefault((lr, scale, rank), []).append((row, base_row))
    out = {}
    for key, pair_list in pairs.items():
        out[key] = entry = dict(n=len(pair_list))
        for value in ("val_loss", "pass_at_1"):
            mean, std = mean_std(row[value] - base_row[value] for row, base_row in pair_list)
            entry[value], entry[value + "_se"] = mean, std / math.sqrt(len(pair_list))
    return out


def lr_table(rows):
    """LoRA and GraLoRA under planted outliers at each adapter learning rate: mean +- SE over the seeds where
    both ran (n), and their paired difference. If GraLoRA's edge under outliers were only LoRA taking too
    large a step, it would shrink at the smaller learning rate."""
    all_rows, rows = rows, scored(rows)
    keys = ("method", "lr", "outlier_scale", "rank_budget")

    def runs(method):  # (lr, scale, rank, seed) of every run of `method`
        return {(row["lr"], row["outlier_scale"], row["rank_budget"], row["seed"]) for row in rows
                if row["method"] == method}

    both = runs("lora") & runs("gralora")
    paired_rows = [row for row in rows if row["method"] in ("lora", "gralora")
                   and (row["lr"], row["outlier_scale"], row["rank_budget"], row["seed"]) in both]
    summary = {tuple(e[key] for key in keys): e for e in group_stats(paired_rows, keys, ["val_loss", "pass_at_1"])}
    lines = [f"{'rank':>4}{'outlier':>8}{'lr':>8}  {'LoRA val loss':<17}{'GraLoRA val loss':<17}{'paired G-L':<18}"
             f"{'LoRA pass@1':<15}{'GraLoRA pass@1':<15}{'paired G-L':<16}{'n':>2}"]
    diffs = paired_differences(rows)
    for lr, scale, rank in sorted(diffs, key=lambda key: (key[2], key[1], -key[0])):
        d = diffs[(lr, scale, rank)]
        lora, gra = summary[("lora", lr, scale, rank)], summary[("gralora", lr, scale, rank)]
        lines.append(f"{rank:>4}{'x%g' % scale:>8}{lr:>8g}  "
                     + "".join(f"{e['val_loss']:.4f}+-{e['val_loss_se']:.4f}  " for e in (lora, gra))
                     + f"{d['val_loss']:+.4f}+-{d['val_loss_se']:.4f}   "
                     + "".join(f"{100 * e['pass_at_1']:5.1f}+-{100 * e['pass_at_1_se']:.1f}  " for e in (lora, gra))
                     + f"  {100 * d['pass_at_1']:+.1f}+-{100 * d['pass_at_1_se']:.1f}  {d['n']:>2}")
    return "\n".join(lines + diverged_note(all_rows))


def load_studies(paths):
    """The rows of several study files (one learning rate each), checked: every row records its lr, and no
    (method, lr, outlier_scale, rank_budget, seed) appears twice (the same file given twice, or two files
    that ran the same configuration), which would silently count a run twice."""
    rows, seen = [], {}
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"no study file {path}")
        for row in json.load(open(path)):
            if "lr" not in row:
                raise ValueError(f"{path}: a {row['method']} row records no lr; add the rate it was trained with")
            key = tuple(row[name] for name in ("method", "lr", "outlier_scale", "rank_budget", "seed"))
            if key in seen:
                raise ValueError(f"run {key} (method, lr, outlier scale, rank, seed) is in both {seen[key]} and {path}")
            seen[key] = path
            rows.append(row)
    return rows


PANELS = (("val_loss", "val loss"), ("pass_at_1", "pass@1 % (held-out)"))  # the two rows of the study figures


def plot_lr_comparison(rows, path):
    """Val loss and pass@1 against the planted outlier's factor, one column per rank that ran at more than one adapter
    learning rate, LoRA and GraLoRA at each rate (mean +- std over seeds)."""
    rows = scored(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["method"] in ("lora", "gralora")]
    summary = group_stats(rows, ("method", "lr", "outlier_scale", "rank_budget"), ["val_loss", "pass_at_1"])
    lrs = sorted({e["lr"] for e in summary}, reverse=True)
    lrs_at = {}
    for e in summary:
        lrs_at.setdefault(e["rank_budget"], set()).add(e["lr"])
    ranks = sorted(rank for rank, rates in lrs_at.items() if len(rates) > 1)
    if not ranks:
        raise ValueError(f"no rank ran at more than one learning rate (rates found: {lrs})")
    fig, axes = plt.subplots(2, len(ranks), figsize=(4.6 * len(ranks), 6.4), squeeze=False)
    styles = dict(zip(lrs, itertools.cycle(("-", "--", ":", "-."))))
    for (col, rank), (row_i, (value, name)) in itertools.product(enumerate(ranks), enumerate(PANELS)):
        ax, unit = axes[row_i][col], 100 if value == "pass_at_1" else 1
        for method, lr in itertools.product(("lora", "gralora"), lrs):
            pts = sorted((e["outlier_scale"], unit * e[value], unit * e[value + "_std"]) for e in summary
                         if (e["method"], e["lr"], e["rank_budget"]) == (method, lr, rank))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                            capsize=3, color=METHOD_COLORS[method], ls=styles[lr], label=f"{method} lr={lr:g}")
        ax.set_xscale("log")
        low, high = ax.get_ylim()
        if value == "val_loss" and high > 5 * max(low, 1e-3):  # diverged runs: a log axis keeps the rest visible
            ax.set_yscale("log")
        ax.set(xlabel="planted outlier factor", ylabel=name if col == 0 else None,
               title=f"rank {rank}" if row_i == 0 else None)
    axes[0][-1].legend(fontsize=7, handlelength=3.5)
    fig.suptitle("Does GraLoRA's edge under outliers survive a smaller learning rate? (mean +- std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_finetune_study(rows, path):
    """Val loss and pass@1 vs rank, one column per outlier scale, one line per method (FFT: a band)."""
    rows = scored(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({row["outlier_scale"] for row in rows})
    summary = group_stats(rows, ("method", "rank_budget", "outlier_scale"), ["val_loss", "pass_at_1"])
    fig, axes = plt.subplots(2, len(scales), figsize=(4.2 * len(scales), 6.4), squeeze=False, sharey="row")
    log_y = max(e["val_loss"] for e in summary) > 5 * min(e["val_loss"] for e in summary)
    for (col, scale), (row_i, (value, name)) in itertools.product(enumerate(scales), enumerate(PANELS)):
        ax, unit = axes[row_i][col], 100 if value == "pass_at_1" else 1
        for method in ("lora", "gralora", "hybrid"):
            pts = sorted((e["rank_budget"], unit * e[value], unit * e[value + "_std"], e["n"]) for e in summary
                         if e["method"] == method and e["outlier_scale"] == scale)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            ms=4, capsize=3, color=METHOD_COLORS[method], label=f"{method} (n={pts[0][3]})")
        for e in summary:
            if e["method"] == "fft" and e["outlier_scale"] == scale:
                mean, std = unit * e[value], unit * e[value + "_std"]
                ax.axhline(mean, color=METHOD_COLORS["fft"], ls=":", label=f"fft (n={e['n']})")
                ax.axhspan(mean - std, mean + std, color=METHOD_COLORS["fft"], alpha=0.08)
        ax.set_xscale("log", base=2)
        if value == "val_loss" and log_y:
            ax.set_yscale("log")  # diverged runs: a log axis keeps the others apart
        ax.set(xlabel="rank (LoRA-equivalent budget)", ylabel=name if col == 0 else None,
               title=f"planted outlier x{scale:g}" if row_i == 0 else None)
        if row_i == 0 and col == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Fine-tuning the tiny GPT with a planted outlier channel (mean +- std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The whole study from the command line
# ---------------------------------------------------------------------------------------------------------


PARTS = ("measure", "gradients", "finetune", "lr", "figures")


def build_parser():
    """The command line. Every list is space-separated (`--seeds 0 1 2 3 4`), as in `python -m tiny_gpt`."""
    parser = argparse.ArgumentParser(
        prog="python -m study.outliers",
        description="Outlier channels and gradient entanglement on the tiny GPT: measure, plant, gradient "
                    "deviation, and a fine-tuning study (LoRA, GraLoRA, Hybrid, FFT) with planted outliers.")
    add = parser.add_argument
    add("--parts", nargs="+", choices=PARTS, default=["measure", "gradients", "finetune"],
        help="what to run: measure, gradients, finetune; lr compares learning rates from finished study files and "
             "figures redraws the gradient study's figure and table from its JSON (these two train nothing)")
    add("--preset", default="cpu", help="model and training preset from tiny_gpt.train.PRESETS")
    add("--ranks", nargs="+", type=int, default=[4, 16, 64], help="LoRA-equivalent ranks (Hybrid: up to 16)")
    add("--scales", nargs="+", type=float, default=[1.0, 10.0, 100.0], help="planted outlier factors (1 = none)")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="fine-tuning seeds")
    add("--channel", type=int, default=0, help="the input channel that gets the outlier")
    add("--methods", nargs="+", choices=STUDY_METHODS, default=list(STUDY_METHODS), help="fine-tuning methods")
    add("--finetune-steps", type=int, default=100,
        help="fine-tuning steps (the cpu preset's 150 do not fit the study in 30 minutes)")
    add("--n-test", type=int, default=None, help="override the preset's held-out task count")
    add("--n-val", type=int, default=None, help="override the preset's validation task count")
    add("--max-minutes", type=float, default=None,
        help="stop starting fine-tuning runs after this long (the runs go in priority order)")
    add("--lr-adapter", type=float, default=None,
        help="adapter peak learning rate (default: the preset's); give each rate its own --out")
    add("--compare", nargs="+", default=[], help="lr part: study files (other --lr-adapter runs) to compare with --out")
    add("--grad-ranks", nargs="+", type=int, default=[4, 16, 64], help="ranks of the gradient study")
    add("--grad-scales", nargs="+", type=float, default=[1.0, 100.0], help="outlier factors of the gradient study")
    add("--grad-batch", type=int, default=8, help="tasks per batch in the gradient study")
    add("--grad-steps", nargs="+", type=int, default=[0, 10],
        help="adapter states of the gradient study: AdamW steps before measuring (0 = init)")
    add("--grad-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the gradient study")
    add("--out", default="study/results/outliers.json",
        help="fine-tuning rows; the other parts write outliers_<part>.json/.png beside it")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def check_args(args, width):
    """The numbers argparse's types do not check, refused before anything trains: a ValueError naming them.
    `width` is the model's n_embd, the input width of the layers that get the outlier."""
    if not 0 <= args.channel < width:
        raise ValueError(f"--channel must be in [0, {width}) for this preset (n_embd={width}), got {args.channel}")
    for flag in ("scales", "grad_scales"):
        bad = [x for x in getattr(args, flag) if not 0 < x < math.inf]
        if bad:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive finite numbers, got {bad}")
    if args.lr_adapter is not None and not 0 < args.lr_adapter < math.inf:
        raise ValueError(f"--lr-adapter must be a positive finite number, got {args.lr_adapter}")
    bad = [x for x in args.grad_steps if x < 0]
    if bad:
        raise ValueError(f"--grad-steps must be 0 or more, got {bad}")


def study_preset(args):
    """The preset named by --preset, with the study's overrides of its training config."""
    preset = get_preset(args.preset)
    overrides = {name: value for name, value in (("finetune_steps", args.finetune_steps), ("n_test", args.n_test),
                                                 ("n_val", args.n_val), ("lr_adapter", args.lr_adapter))
                 if value is not None}
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **overrides))


def measure_part(base_state, preset, scale, channel, stem):
    """Channel RMS of every adapted layer before and after planting `scale`: JSON, figure, printed table."""
    tokenizer = CharTokenizer()
    model = GPT(preset.gpt)
    model.load_state_dict(base_state)
    corpus = torch.tensor(tokenizer.encode(make_corpus(preset.train.data_seed + 1, 200)))
    T = preset.gpt.block_size
    idx = corpus[: (len(corpus) // T) * T].view(-1, T)[:16]  # (16, T): unseen programs
    before = channel_rms(model, idx)
    plant_outliers(model, scale, channel)
    after = channel_rms(model, idx)
    out = {"scale": scale, "channel": channel, "base": rms_summary(before), "planted": rms_summary(after)}
    write_json(f"{stem}_rms.json", out)
    plot_channel_rms(before, after, plantable_layers(model)[-1], f"{stem}_rms.png")
    print(f"{'layer':<30}{'max/median base':>16}{'planted':>10}")
    for name in before:
        print(f"{name:<30}{out['base'][name]['ratio']:>16.2f}{out['planted'][name]['ratio']:>10.2f}")


def gradients_part(base_state, preset, args, stem, device):
    """The gradient study on the first fine-tuning batches: JSON, figure, printed table."""
    examples = encode_tasks(tasks_for(preset.train).train, CharTokenizer())
    B = args.grad_batch
    batches = [collate(examples[i * B:(i + 1) * B], device) for i in range(max(args.grad_steps) + 1)]
    rows = gradient_study(base_state, preset.gpt, batches, args.grad_ranks, args.grad_scales, args.grad_seeds,
                          args.channel, tuple(args.grad_steps), lr=preset.train.lr_adapter)
    write_json(f"{stem}_gradients.json", rows)
    plot_gradient_study(rows, f"{stem}_gradients.png")
    print(gradient_table(rows))


def gradient_table(rows):
    """The gradient study's table: the planted layers' measures, mean +- std over seeds, per configuration."""
    keys = ("train_steps", "outlier_scale", "r", "method")
    lines = [f"{'steps':>5}{'outlier':>8}{'r':>4} {'method':<8} deviation (all cols)  (other cols)    "
             f"swamped share    [planted layers, mean+-std over seeds]"]
    summary = group_stats([row for row in rows if row["layers"] == "planted"], keys,
                          ["deviation", "deviation_others", "columns_swamped"])
    for e in sorted(summary, key=lambda e: tuple(e[key] for key in keys)):
        lines.append(f"{e['train_steps']:>5}{'x%g' % e['outlier_scale']:>8}{e['r']:>4} {e['method']:<8} "
                     f"{e['deviation']:.3f}+-{e['deviation_std']:.3f}      {e['deviation_others']:.3f}+-"
                     f"{e['deviation_others_std']:.3f}    {e['columns_swamped']:.3f}+-{e['columns_swamped_std']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = study_preset(args)
        width = preset.gpt.n_embd
        check_args(args, width)
        runs = plan_study(args.methods, args.ranks, args.scales, args.seeds, width) if "finetune" in args.parts else []
        if "gradients" in args.parts:  # its ranks, checked as the fine-tuning runs are
            plan_runs(["lora", "gralora"], args.grad_ranks, [0], width=width)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    device, stem = pick_device(), os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Pretrain (or load the cached base) only when something will run: re-reading a finished study file
    # redraws its table and figure without it.
    base_state = None
    if {"measure", "gradients"} & set(args.parts) or ("finetune" in args.parts and pending_runs(runs, args.out)):
        base_state, _ = pretrain(preset.gpt, preset.train, device)
    if "measure" in args.parts:
        measure_part(base_state, preset, max(args.scales), args.channel, stem)
    if "gradients" in args.parts:
        gradients_part(base_state, preset, args, stem, device)
    if "finetune" in args.parts:
        rows = finetune_study(base_state, preset, runs, args.out, args.channel, device, args.max_minutes)
        plot_finetune_study(rows, f"{stem}.png")
        print(finetune_table(rows))
    if "figures" in args.parts:  # the gradient study's figure and table from its JSON, computing nothing
        rows = json.load(open(f"{stem}_gradients.json"))
        plot_gradient_study(rows, f"{stem}_gradients.png")
        print(gradient_table(rows))
    if "lr" in args.parts:
        try:
            rows = load_studies([args.out] + args.compare)
            plot_lr_comparison(rows, f"{stem}_lr.png")
        except ValueError as err:
            parser.error(str(err))
        print(lr_table(rows))


if __name__ == "__main__":
    main()
