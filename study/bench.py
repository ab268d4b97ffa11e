"""Benchmark: does GraLoRA cost what LoRA costs? One adapted layer (and the tiny GPT), timed side by side.

    python -m study.bench                     # the full run (about 1 to 2 minutes on 2 CPU cores)
    python -m study.bench --quick             # a smoke run: 512 tokens, 8 repetitions, rank 16 only
    python -m study.bench --out study/results/bench_cpu.txt

What it measures, at equal rank (same trainable parameters, same matmul FLOPs):
  1. forward + backward of a whole adapted layer (frozen base + adapter, gradients for the input
     and the adapter factors, as inside a network): LoRALinear vs GraLoRALinear vs Hugging Face
     PEFT's GraLoRA layer (when peft is installed; it is given the same factors and checked to
     compute the same output);
  2. the adapter path alone (layer.adapter), forward + backward: no base matmul to hide behind;
  3. a merged GraLoRALinear vs a plain nn.Linear, forward in inference;
  4. memory autograd keeps for backward, per token, against the predicted latent (k*r values per
     token for GraLoRA, r for LoRA): saved-tensor bytes on every device, peak allocated on CUDA;
  5. a whole fine-tuning step of the tiny GPT (forward, backward,
     gradient clipping, AdamW, as tiny_gpt/train.py does it, on its fine-tuning batches) with LoRA,
     GraLoRA and Hybrid GraLoRA on its four linears per block, as step time and tokens/s.
  6. with --forms alone: GraLoRALinear.adapter as gralora.py writes it (paper Eq. 6 as two einsums)
     against the same sums laid out as two batched matmuls (fast_adapter below), forward + backward.

How: all variants of one shape run interleaved in one process (the order rotates every
repetition), after a warm-up; each figure is a median over repetitions, and each ratio is the
median of the per-repetition ratios with its interquartile range in brackets, so that a burst of
load from another process hits both sides of a ratio alike. On CUDA every timing is bracketed by
torch.cuda.synchronize(). The CPU runs always; CUDA too when it is available.
"""

import argparse
import copy
import os
import platform
import statistics
import time
import types

import torch
import torch.nn as nn

import gralora
from tiny_gpt.data import CharTokenizer
from tiny_gpt.model import GPT
from tiny_gpt.train import PRESETS, TARGETS, adapter_spec, collate, encode_tasks, tasks_for

try:
    import peft
except ImportError:  # the PEFT column is optional
    peft = None

# (label, N = in_features, M = out_features, r, k, hybrid_r). LoRA gets rank r + hybrid_r.
SHAPES = [
    ("square, paper's r=64 k=4", 1024, 1024, 64, 4, 0),
    ("attention c_attn", 512, 1536, 32, 2, 0),
    ("square, r=128 k=4", 1024, 1024, 128, 4, 0),
    ("MLP c_fc, Hybrid 8 + 8", 512, 2048, 8, 2, 8),
]


def parse_args():
    p = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call, as (tokens / 512, 512, N) inputs")
    p.add_argument("--reps", type=int, default=40, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions before timing")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 8 reps, 2 warm-ups")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = the CPU, then CUDA too when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of layers and inputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU timings: wall time, or this process's CPU time (steadier on a machine shared with "
                        "other jobs, best with --threads 1); CUDA timings are always wall time")
    p.add_argument("--no-peft", action="store_true", help="leave PEFT's GraLoRA out even if installed")
    p.add_argument("--only-gpt", action="store_true", help="run section 5 (tiny GPT step times) alone")
    p.add_argument("--no-gpt", action="store_true", help="skip section 5 (tiny GPT step times)")
    p.add_argument("--gpt-preset", default=None,
                   help="tiny_gpt preset whose model and batches section 5 uses (default: cpu, or gpu on CUDA)")
    p.add_argument("--gpt-ranks", type=int, nargs="+", default=[16, 64],
                   help="LoRA-equivalent ranks for section 5 (GraLoRA's k by the paper's rule, Hybrid = half LoRA)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile the adapter path (forward + backward) of LoRA and GraLoRA at "
                        "the first shape with torch.profiler and print where the time goes, by operator")
    p.add_argument("--forms", action="store_true",
                   help="instead of the sections above: time the readable einsum adapter against the same sums "
                        "laid out as two batched matmuls (section 6)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args()
    if args.tokens > 512 and args.tokens % 512:
        p.error(f"--tokens={args.tokens}: use at most 512 or a multiple of 512")
    if args.quick:
        args.tokens, args.reps, args.warmup, args.gpt_ranks = 512, 8, 2, [16]
    return args


# -----------------------------------------------------------------------------
# Timing


def clock_for(device, args):
    return time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases, reps, warmup, device, clock=time.perf_counter):
    """Run every case once per repetition, rotating the order; return {name: [seconds, ...]}."""
    names = list(cases)
    times = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            t0 = clock()
            cases[name]()
            sync(device)
            if rep >= warmup:
                times[name].append(clock() - t0)
    return times


def ratio(times, num, den):
    """Median and interquartile range of the per-repetition ratios num / den."""
    r = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return q[1], q[0], q[2]


def fmt_ratio(med_lo_hi):
    med, lo, hi = med_lo_hi
    return f"{med:.3f} [{lo:.2f}-{hi:.2f}]"


def fwd_bwd(fn, x, grad_out, params):
    """One training step's worth of work for fn: forward, backward with a fixed output gradient."""
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(grad_out)
    return step


# -----------------------------------------------------------------------------
# The layers of one shape, all on the same frozen base weights


def build(N, M, r, k, hybrid_r, device, dtype, use_peft):
    torch.manual_seed(0)
    base = nn.Linear(N, M, device=device, dtype=dtype)
    layers = {
        "LoRA": gralora.LoRALinear(_copy(base), r + hybrid_r),
        "GraLoRA": gralora.GraLoRALinear(_copy(base), r, k=k, hybrid_r=hybrid_r),
    }
    for layer in layers.values():
        trained_looking(layer)
    if use_peft:
        config = peft.GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, alpha=layers["GraLoRA"].alpha,
                                    target_modules=["0"])
        model = peft.get_peft_model(nn.Sequential(_copy(base)), config)
        peft_layer = model.base_model.model[0]  # the adapted Linear itself, not the PeftModel wrapper
        with torch.no_grad():
            for key, t in gralora.to_peft_gralora(layers["GraLoRA"]).items():
                name, _, sub = key.partition(".")
                target = getattr(peft_layer, name)["default"]
                (getattr(target, sub) if sub else target).copy_(t)
        layers["PEFT"] = peft_layer
    return layers


@torch.no_grad()
def trained_looking(layer):
    """Give the adapter's B factors (zero at init) small random values, as after training: B != 0."""
    for name, p in layer.named_parameters():
        if name.endswith("B"):
            p.normal_(std=0.02)


def _copy(linear):
    new = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    new.load_state_dict(linear.state_dict())
    return new


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def make_input(tokens, N, device, dtype):
    seq = min(tokens, 512)
    return torch.randn(tokens // seq, seq, N, device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# Memory


def saved_bytes(fn, x, params):
    """Bytes of the tensors autograd saves for backward during fn(x), except x and the parameters."""
    exclude = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def saved_bytes_per_token(fn, N, params, tokens, device, dtype):
    """Slope of saved bytes between T/2 and T tokens: what backward keeps for every extra token."""
    half = max(tokens // 2, 1)
    xa = make_input(tokens, N, device, dtype).requires_grad_(True)
    xb = make_input(half, N, device, dtype).requires_grad_(True)
    return (saved_bytes(fn, xa, params) - saved_bytes(fn, xb, params)) / (xa[..., 0].numel() - xb[..., 0].numel())


def cuda_peak_bytes(step, device):
    """Peak memory allocated during one step, above what was allocated before it."""
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


# -----------------------------------------------------------------------------
# The report


def machine_lines(devices):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
             f"software: python {platform.python_version()}, torch {torch.__version__}, "
             f"peft {peft.__version__ if peft else 'not installed'}"]
    if any(d.type == "cuda" for d in devices):
        lines.append(f"gpu: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        lines.append("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in load))
        if load[0] > 0.5:
            lines.append(f"note: other processes are running (load {load[0]:.1f} on {os.cpu_count()} CPUs): "
                         "ratios pair interleaved runs, but times are slower and noisier than when idle")
    return lines


def run_device(device, args, say):
    """Sections 1-4 on one device: every shape of SHAPES, measured, then reported section by section."""
    dtype = getattr(torch, args.dtype)
    use_peft = peft is not None and not args.no_peft
    seq = min(args.tokens, 512)
    clock = "process CPU time" if clock_for(device, args) is time.process_time else "wall time"
    say(f"\n== {device.type}: {args.tokens} tokens as ({args.tokens // seq}, {seq}, N) inputs, {args.dtype}, "
        f"{args.reps} reps after {args.warmup} warm-up, {clock} ==")
    say("ratios: median of per-repetition ratios [interquartile range]; ms: medians\n")
    rows = [measure_shape(shape, device, dtype, args, use_peft) for shape in SHAPES]
    layer_rows, adapter_rows, merged_rows, memory_rows = zip(*rows)
    head = f"{'shape':26s} {'N->M':>9} {'rank':5s} {'k':3s}"
    say("1. layer forward+backward (frozen base + adapter; grads for x and the adapter factors)")
    say(f"{head} | {'LoRA ms':>8} {'Gra ms':>8} {'PEFT ms':>8} | {'GraLoRA / LoRA':>19} {'GraLoRA / PEFT':>19}")
    for row in layer_rows:
        say(row)
    say("   targets: GraLoRA / LoRA <= 1.05, GraLoRA / PEFT <= 1.00\n")
    say("2. adapter path alone, forward+backward (layer.adapter(x): no base matmul to hide the overhead)")
    say(f"{head} | {'LoRA ms':>8} {'Gra ms':>8} | {'GraLoRA / LoRA':>19}")
    for row in adapter_rows:
        say(row)
    say("")
    say("3. merged GraLoRA layer vs plain nn.Linear with the same weight, inference forward")
    say(f"{head} | {'Linear':>8} {'merged':>8} | {'merged / Linear':>19}")
    for row in merged_rows:
        say(row)
    say("   target: merged / Linear <= 1.02\n")
    item = torch.empty((), dtype=dtype).element_size()
    say("4. bytes per token that autograd saves for backward beyond x and the weights (saved_tensors_hooks),")
    say(f"   (predicted): the latent, r values per token for LoRA, k*r for GraLoRA (+ hybrid_r), {item} bytes each")
    say(f"{head} | {'LoRA':>15} {'GraLoRA':>15}" + (f" {'PEFT':>15}" if use_peft else ""))
    for row in memory_rows:
        say(row)


def measure_shape(shape, device, dtype, args, use_peft):
    """One row of each of sections 1-4 for one entry of SHAPES: (layer, adapter, merged, memory) as text."""
    label, N, M, r, k, hybrid_r = shape
    layers = build(N, M, r, k, hybrid_r, device, dtype, use_peft)
    x = make_input(args.tokens, N, device, dtype).requires_grad_(True)
    grad_out = torch.randn(*x.shape[:-1], M, device=device, dtype=dtype)
    if use_peft:  # the PEFT layer computes the same function, so the race is fair
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        with torch.no_grad():
            torch.testing.assert_close(layers["PEFT"](x), layers["GraLoRA"](x), rtol=tol, atol=tol)
    name = f"{label:26s} {N:>4}->{M:<4} r={r + hybrid_r:<3} k={k}"

    # 1 + 2: whole layer and adapter path alone, all in one interleaved loop
    cases = {key: fwd_bwd(layer, x, grad_out, trainable(layer)) for key, layer in layers.items()}
    for key in ("LoRA", "GraLoRA"):
        cases[key + " adapter"] = fwd_bwd(layers[key].adapter, x, grad_out, trainable(layers[key]))
    times = interleaved(cases, args.reps, args.warmup, device, clock_for(device, args))
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    peft_ms = f"{ms['PEFT']:8.2f}" if use_peft else "       -"
    layer_row = (f"{name} | {ms['LoRA']:8.2f} {ms['GraLoRA']:8.2f} {peft_ms} | "
                 f"{fmt_ratio(ratio(times, 'GraLoRA', 'LoRA')):>19}"
                 + (f" {fmt_ratio(ratio(times, 'GraLoRA', 'PEFT')):>19}" if use_peft else "                   -"))
    adapter_row = (f"{name} | {ms['LoRA adapter']:8.2f} {ms['GraLoRA adapter']:8.2f} | "
                   f"{fmt_ratio(ratio(times, 'GraLoRA adapter', 'LoRA adapter')):>19}")
    merged_row = f"{name} | " + time_merged(layers["GraLoRA"], x, device, args)
    memory_row = f"{name} |" + memory_cells(layers, shape, x, grad_out, device, dtype, args)
    return layer_row, adapter_row, merged_row, memory_row


def time_merged(layer, x, device, args):
    """Section 3's cells: a merged `layer` against a plain nn.Linear holding the same merged weight, inference
    forward; the layer is unmerged again afterwards."""
    layer.merge()
    plain = _copy(layer.base)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x))

    def inference(module):
        def call():
            with torch.no_grad():
                module(x)
        return call

    times = interleaved({"Linear": inference(plain), "merged": inference(layer)},
                        2 * args.reps, args.warmup, device, clock_for(device, args))
    layer.unmerge()
    return (f"{1e3 * statistics.median(times['Linear']):8.2f} {1e3 * statistics.median(times['merged']):8.2f} | "
            f"{fmt_ratio(ratio(times, 'merged', 'Linear')):>19}")


def memory_cells(layers, shape, x, grad_out, device, dtype, args):
    """Section 4's cells: bytes per token saved for backward by each layer (predicted in brackets) and, on
    CUDA, the peak memory of one step."""
    _, N, _, r, k, hybrid_r = shape
    item = torch.empty((), dtype=dtype).element_size()  # bytes per value
    predicted = {"LoRA": gralora.adapter_latent(1, r + hybrid_r) * item,
                 "GraLoRA": gralora.adapter_latent(1, r, k, hybrid_r) * item}
    cells = ""
    for name, layer in layers.items():
        per_token = saved_bytes_per_token(layer, N, list(layer.parameters()), args.tokens, device, dtype)
        cells += f" {per_token:7.0f} ({predicted.get(name, predicted['GraLoRA']):5d})"
    if device.type == "cuda":
        cells += " | peak MiB above inputs:"
        for name, layer in layers.items():
            peak = cuda_peak_bytes(fwd_bwd(layer, x, grad_out, trainable(layer)), device)
            cells += f" {name} {peak / 2**20:.1f}"
    return cells


def tiny_gpt_steps(device, args, say):
    """Section 5: fine-tuning step time of the tiny GPT, one model per method, interleaved."""
    name = args.gpt_preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    cfg = preset.train
    examples = encode_tasks(tasks_for(cfg).train, CharTokenizer())
    gen = torch.Generator().manual_seed(0)
    batches = [collate([examples[i] for i in torch.randint(len(examples), (cfg.finetune_batch,), generator=gen)],
                       device) for _ in range(8)]
    tokens = statistics.mean(x.numel() for x, _ in batches)

    cases = {}
    for rank in args.gpt_ranks:
        for method in ("lora", "gralora", "hybrid"):
            try:
                r, k, hybrid_r = adapter_spec(method, rank, width=preset.gpt.n_embd)
            except ValueError:
                continue
            torch.manual_seed(0)  # random weights: step time does not depend on them
            model = GPT(preset.gpt).to(device)
            gralora.add_adapters(model, TARGETS, method=method, r=r, k=k, hybrid_r=hybrid_r)
            cases[(rank, method, k, hybrid_r)] = _train_step(model, batches, cfg, device)
    times = interleaved(cases, args.reps, args.warmup, device, clock_for(device, args))

    clock = "process CPU time" if clock_for(device, args) is time.process_time else "wall time"
    say(f"\n5. tiny GPT fine-tuning step on {device.type} (preset {name!r}: {preset.gpt.n_layer} layers, width "
        f"{preset.gpt.n_embd}, batch {cfg.finetune_batch}, {tokens:.0f} tokens per step; forward, backward, clip, "
        f"AdamW; {args.reps} reps after {args.warmup} warm-up, {clock})")
    say(f"{'rank':>4} {'method':8s} {'k':>2} {'hybrid_r':>8} | {'step ms':>8} {'tokens/s':>9} | {'vs LoRA':>19}")
    for (rank, method, k, hybrid_r), t in times.items():
        lora = (rank, "lora", 1, 0)
        versus = fmt_ratio(ratio(times, (rank, method, k, hybrid_r), lora)) if method != "lora" else "1"
        say(f"{rank:>4} {method:8s} {k:>2} {hybrid_r:>8} | {1e3 * statistics.median(t):8.1f} "
            f"{tokens / statistics.median(t):9,.0f} | {versus:>19}")
    say("   target: GraLoRA step time <= 1.05 x LoRA's at the same rank")


def _train_step(model, batches, cfg, device):
    """One optimizer step as tiny_gpt/train.py takes it, cycling through the same batches for every model."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_adapter, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    count = [0]

    def step():
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
    return step


def profile_adapters(args, say, reps=10):
    """Self time per operator of layer.adapter(x) forward + backward: matmuls vs layout copies."""
    from torch.profiler import ProfilerActivity, profile

    label, N, M, r, k, hybrid_r = SHAPES[0]
    layers = build(N, M, r, k, hybrid_r, torch.device("cpu"), torch.float32, use_peft=False)
    x = make_input(args.tokens, N, torch.device("cpu"), torch.float32).requires_grad_(True)
    say(f"profile: adapter path forward + backward, {label} ({N}->{M}, r={r}, k={k}), {args.tokens} tokens, "
        f"{torch.get_num_threads()} threads; self time per call, {reps} calls after 3 warm-up")
    for name, layer in layers.items():
        for _ in range(3):
            layer.adapter(x).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                layer.adapter(x).sum().backward()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        say(f"  {name}: {total / reps / 1e3:.2f} ms per call")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]:
            ms, share = e.self_cpu_time_total / reps / 1e3, 100 * e.self_cpu_time_total / total
            say(f"    {e.key:<28}{ms:8.2f} ms  {share:5.1f}%")


# -----------------------------------------------------------------------------
# Section 6: the readable forward (two einsums) against the same sums as two batched matmuls

FORM_SHAPES = [(1024, 1024, 16, 2, 0), (1024, 1024, 64, 4, 0), (1024, 1024, 8, 2, 8),
               (4096, 4096, 16, 2, 0), (4096, 4096, 64, 4, 0)]  # (N, M, r, k, hybrid_r)


def fast_adapter(layer, x):
    """What GraLoRALinear.adapter computes, laid out as two batched matmuls (batched over input blocks j,
    then over output blocks i) instead of two einsums, with the hybrid down-projection riding along in the
    first one. Section 6 times the two layouts against each other."""
    k, _, s, n = layer.A.shape
    r, h, m = layer.r, layer.hybrid_r, layer.B.shape[2]
    x2d = x.reshape(-1, k * n)  # (T, N)
    T = x2d.shape[0]
    x_blocks = x2d.view(T, k, n).transpose(0, 1)  # (k, T, n): [j] = x_j, a view
    A_by_input = layer.A.permute(1, 3, 0, 2).reshape(k, n, r)  # (k, n, r): [j] = [A_0j^T .. A_(k-1)j^T]
    if h:
        hybrid_A_by_input = layer.hybrid_A.view(h, k, n).permute(1, 2, 0)  # (k, n, h)
        A_by_input = torch.cat([A_by_input, hybrid_A_by_input], dim=-1)  # (k, n, r + h)
    latent = x_blocks @ A_by_input  # (k, T, r + h)
    if h:
        latent, hybrid_parts = latent.split([r, h], dim=-1)  # (k, T, r), (k, T, h)
    latent = latent.view(k, T, k, s).permute(2, 1, 0, 3).reshape(k, T, r)  # (k_out i, T, r): [i] = A_ij x_j, j = 0..k-1
    B_by_output = (layer.scaling * layer.B).transpose(2, 3).reshape(k, r, m)  # (k, r, m)
    y = (latent @ B_by_output).transpose(0, 1)  # (T, k, m): y[:, i] = scaling * y_i
    if h:
        hybrid = hybrid_parts.sum(0) @ (layer.scaling * layer.hybrid_B).t()  # (T, M)
        y = hybrid.view(T, k, m) + y  # (T, k, m)
    return y.reshape(*x.shape[:-1], k * m)  # (..., M)


def compare_forms(device, args, say):
    dtype = getattr(torch, args.dtype)
    clock = clock_for(device, args)
    say(f"\n6. GraLoRA adapter path, forward+backward (grads for x, A, B): readable einsum form (gralora.py) vs "
        f"the same sums as two batched matmuls; {device.type}, {args.tokens} tokens, {args.dtype}, {args.reps} reps "
        f"after {args.warmup} warm-up, {'process CPU time' if clock is time.process_time else 'wall time'}")
    say("   adapter alone (layer.adapter), then the whole layer (frozen base + adapter)")
    say(f"{'N->M':>10} {'r':>3} {'k':>2} {'hyb':>3} | {'einsum ms':>9} {'bmm ms':>8} | {'einsum / bmm':>19} | "
        f"{'layer ms':>9} {'bmm ms':>8} | {'einsum / bmm':>19}")
    for N, M, r, k, hybrid_r in FORM_SHAPES:
        torch.manual_seed(0)
        layer = gralora.GraLoRALinear(nn.Linear(N, M, device=device, dtype=dtype), r, k=k, hybrid_r=hybrid_r)
        trained_looking(layer)
        x = make_input(args.tokens, N, device, dtype).requires_grad_(True)
        grad_out = torch.randn(*x.shape[:-1], M, device=device, dtype=dtype)
        with torch.no_grad():  # the two forms compute the same thing (tested in float64 in test_gralora.py)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(fast_adapter(layer, x), layer.adapter(x), rtol=tol, atol=tol)
        fast = copy.deepcopy(layer)  # the same layer (frozen base included) with fast_adapter as its adapter path
        fast.adapter = types.MethodType(fast_adapter, fast)
        cases = {"einsum": fwd_bwd(layer.adapter, x, grad_out, trainable(layer)),
                 "bmm": fwd_bwd(fast.adapter, x, grad_out, trainable(fast)),
                 "einsum layer": fwd_bwd(layer, x, grad_out, trainable(layer)),
                 "bmm layer": fwd_bwd(fast, x, grad_out, trainable(fast))}
        times = interleaved(cases, args.reps, args.warmup, device, clock)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        say(f"{N:>4}->{M:<5} {r:>3} {k:>2} {hybrid_r:>3} | {ms['einsum']:9.2f} {ms['bmm']:8.2f} | "
            f"{fmt_ratio(ratio(times, 'einsum', 'bmm')):>19} | {ms['einsum layer']:9.2f} {ms['bmm layer']:8.2f} | "
            f"{fmt_ratio(ratio(times, 'einsum layer', 'bmm layer')):>19}")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    say(f"GraLoRA vs LoRA at equal rank: python -m study.bench {' '.join(os.sys.argv[1:])}".rstrip())
    for line in machine_lines(devices):
        say(line)
    start = time.perf_counter()
    if args.profile:
        devices = []
        profile_adapters(args, say)
    if args.forms:
        for device in devices:
            compare_forms(device, args, say)
        devices = []
    for device in devices:
        if not args.only_gpt:
            run_device(device, args, say)
        if not args.no_gpt:
            tiny_gpt_steps(device, args, say)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    say(f"\ndone in {time.perf_counter() - start:.0f} s; load average at the end: {load}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
