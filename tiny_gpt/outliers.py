"""Outlier input channels and gradient entanglement: the paper's causal story, tested on the tiny GPT.

GraLoRA's motivation (Jung et al., arXiv 2505.20355, Sec. 3.2-3.3) is a mechanism, not just a score:

  1. Large LLMs have a few input channels whose activations are orders of magnitude larger than the rest
     (paper Fig. 3a).
  2. FFT's weight gradient is G = dL/dW = dY^T X (M, N): an outlier input channel c only inflates column c.
  3. LoRA's factors see G through each other. One SGD step of size lr on A and B changes dW = s B A by,
     to first order in lr (paper Eq. 4 and the text around it),

         dW_step = -lr * s^2 * (G A^T A  +  B B^T G)                                          (LoRA)

     The term G A^T A mixes the columns of G: the outlier's column c leaks into EVERY input column
     through row c of A^T A ("gradient entanglement").
  4. GraLoRA's blocks each see their own slice of G, so the same step changes block (i, j) by

         dW_step[i, j] = -lr * s^2 * (G_ij A_ij^T A_ij  +  B_ij B_ij^T G_ij)               (GraLoRA)

     and the outlier's column can only leak into the other columns of ITS input slice (N/k columns,
     not N). Hybrid GraLoRA adds the LoRA formula for its plain-LoRA part.

Tiny models trained for minutes do not grow such outliers, so this module can plant one, without changing
the function the base model computes: multiply a LayerNorm's gain and bias on one channel by s and divide the
matching input column of the Linear it feeds by s. The adapters then see an input channel s times larger, as
in a large LLM, while the base model's logits stay the same.

What is here:
  * channel_rms / rms_summary / plot_channel_rms: measure per-input-channel magnitude (Fig. 3a in miniature);
  * plant_outlier / plant_outliers: the function-preserving plant;
  * induced_update / deviation / outlier_leak / gradient_deviation: the first-order update each method makes
    from a batch's FFT gradient, and how far (and where) it deviates from FFT's (Fig. 3b-c and 6 in miniature);
  * finetune_study: LoRA, GraLoRA, Hybrid and FFT fine-tuned on the toy task with and without outliers;
  * a command line that runs the whole study:  python -m tiny_gpt.outliers --help

Shapes: B batch, T tokens, N in_features, M out_features, r rank, k blocks per side, n = N/k, m = M/k,
s = scaling (alpha / r) in formulas, rb = r/k the rank of one block in code.
"""

import argparse
import copy
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

# The Linear layers adapters go on (DESIGN.md), named as in GPT-2, and the LayerNorm that feeds each of the
# two that read a LayerNorm's output directly. Only those two can get a function-preserving planted outlier:
# attn.c_proj reads the attention output and mlp.c_proj reads GELU(c_fc(x)), and GELU(s z) != s GELU(z).
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FED_BY = {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}


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
    ax0.plot(rms_before[layer].numpy(), lw=1, label="base model")
    ax0.plot(rms_after[layer].numpy(), lw=1, alpha=0.8, label="outlier planted")
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
    w[c], b[c] multiplied by s, channel c of ln(x) is s times larger; with column c of the Linear's weight
    divided by s, the Linear's output is exactly what it was:

        W' ln'(x) = sum_{c' != c} W[:, c'] ln(x)_c'  +  (W[:, c] / s) (s ln(x)_c)  =  W ln(x)

    Args:
        model: a tiny_gpt GPT without adapters on `layer` (plant first, then add adapters).
        layer: module name, e.g. "transformer.h.1.mlp.c_fc" or "transformer.h.0.attn.c_attn".
        channel: input channel index, 0 <= channel < in_features.
        scale: s > 0, finite. s = 1 changes nothing.
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
        raise ValueError(f"channel must be an integer in [0, {N}) for {layer} (in_features={N}), got channel={channel!r}")
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

    Why: with dW = s B A, the chain rule gives dL/dB = s G A^T and dL/dA = s B^T G, so the step changes dW by
        s (B - lr s G A^T)(A - lr s B^T G) - s B A = -lr s^2 (G A^T A + B B^T G) + O(lr^2).
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
        A, B = layer.A.detach().to(dtype), layer.B.detach().to(dtype)  # (k, k, rb, n), (k, k, m, rb)
        G_blocks = G.reshape(k, M // k, k, N // k).permute(0, 2, 1, 3)  # (k, k, m, n): G_blocks[i, j] = G_ij
        GAt = torch.einsum("ijmn,ijrn->ijmr", G_blocks, A)  # (k, k, m, rb): G_ij A_ij^T
        GAtA = torch.einsum("ijmr,ijrn->ijmn", GAt, A)  # (k, k, m, n): G_ij A_ij^T A_ij
        BtG = torch.einsum("ijmr,ijmn->ijrn", B, G_blocks)  # (k, k, rb, n): B_ij^T G_ij
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
