"""Pretrain the tiny GPT once (cached on disk), then fine-tune it with FFT, LoRA, GraLoRA or Hybrid GraLoRA.

The recipe is the same for every method, so that only the method differs: the same base model, the same tasks, the
same batches in the same order for a given seed, AdamW with linear warmup and cosine decay, gradient clipping at 1.0,
and the loss counted on the completion tokens only (the prompt is given, not learned). Adapters go on the four linears
of every block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), never on the embedding, whose weight the output head
shares. Functions here take the device as an argument; entry points choose it with `pick_device()`.
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

import gralora

from .data import CharTokenizer, make_corpus, make_tasks
from .evaluate import pass_at_1
from .model import GPT, GPTConfig

TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # adapted in every block
METHODS = ["base", "fft", "lora", "gralora", "hybrid"]  # base = the pretrained model, not fine-tuned


@dataclass
class TrainConfig:
    # pretraining (these fields, the GPTConfig and data_seed key the on-disk cache)
    corpus_programs: int = 4000  # programs in the pretraining corpus (about 90 characters each)
    pretrain_steps: int = 600  # optimizer steps
    pretrain_batch: int = 16  # windows of block_size characters per step
    pretrain_lr: float = 3e-3  # peak learning rate
    pretrain_weight_decay: float = 0.1  # AdamW decay on weight matrices (not on biases, gains)
    pretrain_seed: int = 0  # initialisation and batch order
    # the data
    data_seed: int = 0  # seeds the corpus and the tasks
    n_train: int = 5000  # training tasks (from the train pairs of primitives)
    n_val: int = 200  # validation tasks (own pairs): val loss, and any choice you make
    n_test: int = 300  # held-out tasks (own pairs): pass@1; never used to choose anything
    # fine-tuning
    finetune_steps: int = 150  # optimizer steps
    finetune_batch: int = 16  # tasks per step
    lr_fft: float = 1e-3  # peak learning rate, full fine-tuning
    lr_adapter: float = 1e-2  # peak learning rate, LoRA / GraLoRA / Hybrid
    # both phases
    warmup_frac: float = 0.1  # share of the steps spent warming up linearly from 0
    min_lr_frac: float = 0.1  # the cosine decays to this share of the peak
    grad_clip: float = 1.0  # clip the gradient's global norm
    eval_every: int = 50  # steps between validation losses (and progress lines)
    # bfloat16 autocast of the training forward: None = on CUDA only, True = on (the CPU runs it too), False =
    # off. Val loss and pass@1 are computed in float32, outside autocast, for every method alike.
    bf16: bool = None

    def lr_for(self, method):
        """The fine-tuning peak learning rate of `method` (None for the untouched base model)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        return None if method == "base" else self.lr_fft if method == "fft" else self.lr_adapter


@dataclass
class Preset:
    """A named experiment size: the model, the training recipe and the default sweep."""

    gpt: GPTConfig
    train: TrainConfig
    ranks: list = field(default_factory=lambda: [16])  # LoRA-equivalent ranks (trainable-parameter budgets)
    seeds: list = field(default_factory=lambda: [0])


PRESETS = {
    # Seconds, for the test suite: a 2-layer model barely pretrained; checks the plumbing, not the science.
    "smoke": Preset(
        GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(corpus_programs=500, pretrain_steps=30, pretrain_batch=8, n_train=200, n_val=20,
                    n_test=20, finetune_steps=10, finetune_batch=8, eval_every=5),
        ranks=[4],
    ),
    # Minutes on a 2-core laptop CPU: width 128, so ranks 4..64 go from tiny to half the width.
    "cpu": Preset(GPTConfig(), TrainConfig()),
    # One GPU: a wider, deeper model trained longer (ranks 4..128 against width 384).
    "gpu": Preset(
        GPTConfig(n_layer=6, n_head=6, n_embd=384),
        TrainConfig(corpus_programs=20000, pretrain_steps=3000, pretrain_batch=64, pretrain_lr=1e-3,
                    n_train=20000, n_test=500, finetune_steps=600, finetune_batch=64, lr_fft=3e-4,
                    lr_adapter=3e-3, eval_every=100),
        ranks=[4, 16, 64],
    ),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def pick_device():
    """cuda if there is one, then Apple's mps, then the cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def parse_device(text):
    """torch.device(text) if this machine has that device, else ValueError naming the available ones."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    try:
        device = torch.device(text)
        name = device.type if device.index in (None, 0) else str(device)
    except (RuntimeError, ValueError):
        name = None
    if name not in available:
        raise ValueError(f"device {text!r} is not available here; available: {', '.join(available)}")
    return device


def print_now(message):
    """The default `log`: print and flush at once, so progress shows through a pipe (`| tee log`) too."""
    print(message, flush=True)


def write_atomic(path, save):
    """Call save(file) on a temporary file beside `path`, then os.replace it onto `path` (permissions 0666 less
    the umask): no reader sees a half-written file; a failure or Ctrl-C leaves the old file and no temporary."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            save(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """Write `obj` as indented JSON to `path`, atomically (see write_atomic): OSError, or TypeError if not JSON-able."""
    text = json.dumps(obj, indent=1) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def lr_at(step, steps, peak, warmup_frac, min_lr_frac):
    """Linear warmup to `peak`, then a cosine down to min_lr_frac * peak at the last step."""
    warmup = max(1, round(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class Diverged(ArithmeticError):
    """The training loss became NaN or infinite: the run stopped there."""


def _optimize(model, params, lr, weight_decay, steps, next_batch, cfg, evaluate, log, label):
    """The training loop both phases share. Returns the curve [(step, train_loss, val_loss), ...]; raises
    Diverged at the first non-finite training loss."""
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=lr, betas=(0.9, 0.95))
    device_type = next(model.parameters()).device.type
    bf16 = device_type == "cuda" if cfg.bf16 is None else cfg.bf16  # the training forward only, never eval
    curve, tokens, start, recent = [], 0, time.time(), []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup_frac, cfg.min_lr_frac)
        x, y = next_batch()  # (B, T), (B, T)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        recent.append(loss.item())
        if not math.isfinite(recent[-1]):
            raise Diverged(f"{label}: the training loss is {recent[-1]} at step {step + 1}; stopped")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        tokens += x.numel()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            train_loss, val_loss = sum(recent) / len(recent), evaluate()
            recent = []
            curve.append((step + 1, train_loss, val_loss))
            elapsed = time.time() - start
            log(f"{label} step {step + 1}/{steps} | loss {train_loss:.4f} | val {val_loss:.4f} | "
                f"{tokens / elapsed:,.0f} tok/s | ETA {elapsed / (step + 1) * (steps - step - 1):.0f}s")
            model.train()
    return curve


def _pretrain_config(gpt_cfg, train_cfg):
    """Everything the pretrained weights depend on, as a JSON-able dict: the model config, the pretraining
    fields of the train config, and a hash of the corpus text itself (so editing data.py invalidates it)."""
    shared = ("warmup_frac", "min_lr_frac", "grad_clip")  # the schedule both phases use
    fields = {k: v for k, v in dataclasses.asdict(train_cfg).items()
              if k.startswith(("pretrain_", "corpus_")) or k in shared}
    if train_cfg.bf16:  # bf16 autocast gives other weights; the key names it only when it is on
        fields["bf16"] = True
    corpus_sha256 = hashlib.sha256(make_corpus(train_cfg.data_seed, train_cfg.corpus_programs).encode()).hexdigest()
    return dict(gpt=dataclasses.asdict(gpt_cfg), data_seed=train_cfg.data_seed, corpus_sha256=corpus_sha256, **fields)


def cache_path(gpt_cfg, train_cfg, cache_dir=None):
    """<cache_dir>/base-<hash of _pretrain_config>.pt, cache_dir by default $TINY_GPT_CACHE, else .cache/tiny_gpt.
    The key covers the configs and the corpus, not the model code: after editing model.py, delete the cache."""
    cache_dir = cache_dir or os.environ.get("TINY_GPT_CACHE") or os.path.join(".cache", "tiny_gpt")
    key = hashlib.sha256(json.dumps(_pretrain_config(gpt_cfg, train_cfg), sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, f"base-{key[:16]}.pt")


def pretrain(gpt_cfg, train_cfg, device, cache_dir=None, log=print_now):
    """(state dict on the cpu, from_cache) of the base model: from the cache if it holds one for these configs,
    else trained on the corpus (next-character loss on random windows) and written to the cache."""
    if train_cfg.bf16 is None:  # on CUDA only, as in _optimize: the cache key must say how the weights were trained
        train_cfg = dataclasses.replace(train_cfg, bf16=torch.device(device).type == "cuda")
    path, config = cache_path(gpt_cfg, train_cfg, cache_dir), _pretrain_config(gpt_cfg, train_cfg)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["config"] == config:
                log(f"base model: loaded from {path}")
                return saved["state_dict"], True
            log(f"cache {path} was made with another config; pretraining again")
        except Exception as err:  # a truncated or foreign file; its message can run to a paragraph, so not shown
            log(f"cache {path} is unreadable ({type(err).__name__}); pretraining again")

    corpus = torch.tensor(CharTokenizer().encode(make_corpus(train_cfg.data_seed, train_cfg.corpus_programs)))
    split = int(0.9 * len(corpus))
    train_ids, val_ids = corpus[:split], corpus[split:]
    torch.manual_seed(train_cfg.pretrain_seed)
    model = GPT(gpt_cfg).to(device)
    T, B = gpt_cfg.block_size, train_cfg.pretrain_batch
    gen = torch.Generator().manual_seed(train_cfg.pretrain_seed)

    def windows(ids, starts):
        chunk = torch.stack([ids[s : s + T + 1] for s in starts.tolist()]).to(device)  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]  # inputs, next-character targets

    def next_batch():
        return windows(train_ids, torch.randint(len(train_ids) - T - 1, (B,), generator=gen))

    val_starts = torch.arange(0, len(val_ids) - T - 1, T)[:32]  # fixed windows: a comparable val loss

    @torch.no_grad()
    def evaluate():
        model.eval()
        return model(*windows(val_ids, val_starts))[1].item()

    log(f"pretraining a {model.num_params():,}-parameter GPT on {len(train_ids):,} characters of code")
    _optimize(model, list(model.parameters()), train_cfg.pretrain_lr, train_cfg.pretrain_weight_decay,
              train_cfg.pretrain_steps, next_batch, train_cfg, evaluate, log, "pretrain")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda f: torch.save(dict(config=config, state_dict=state), f))
    log(f"base model: saved to {path}")
    return state, False


_make_tasks = functools.lru_cache(maxsize=4)(make_tasks)  # every run of a sweep uses the very same tasks


def tasks_for(train_cfg):
    """The tasks (make_tasks) of these settings, made once."""
    return _make_tasks(train_cfg.data_seed, train_cfg.n_train, train_cfg.n_val, train_cfg.n_test)


def encode_tasks(tasks, tokenizer):
    """Each task as (input ids, target ids) tensors, the targets -1 on prompt positions (no loss there)."""
    examples = []
    for task in tasks:
        ids = torch.tensor(tokenizer.encode(task.prompt + task.completion))  # (L,)
        x, y = ids[:-1], ids[1:].clone()  # y[t] is the character after x[t]
        y[: len(task.prompt) - 1] = -1  # targets inside the prompt are not learned
        examples.append((x, y))
    return examples


def collate(examples, device):
    """Pad a list of (x, y) to one (B, T) batch: inputs with 0 (newline), targets with -1 (ignored). Padding goes
    at the end, and the model is causal, so it never changes the real positions' logits."""
    T = max(len(x) for x, _ in examples)
    xs = torch.zeros(len(examples), T, dtype=torch.long)  # (B, T)
    ys = torch.full((len(examples), T), -1, dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(examples):
        xs[i, : len(x)], ys[i, : len(y)] = x, y
    return xs.to(device), ys.to(device)


@torch.no_grad()
def completion_loss(model, examples, device, batch_size=64):
    """Mean cross-entropy per completion character over `examples` (every character weighs the same)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y = collate(examples[start : start + batch_size], device)
        _, loss = model(x, y)
        n = (y != -1).sum().item()
        total, count = total + loss.item() * n, count + n
    return total / count


def adapter_spec(method, rank, k=None, hybrid_r=None, width=None):
    """(r, k, hybrid_r) for gralora.add_adapters from `rank`, the LoRA rank with the same trainable parameters.

    lora: r = rank, k = 1. gralora: r = rank and k by the paper's rule (2 below r = 64, else 4) unless given.
    hybrid (PEFT's semantics: r is the GraLoRA rank, hybrid_r a plain LoRA on top): hybrid_r = rank // 2 unless
    given and r = rank - hybrid_r, so it costs what LoRA at `rank` costs. ValueError names bad numbers."""
    if method not in ("lora", "gralora", "hybrid"):
        raise ValueError(f"method={method!r} has no adapter; adapter methods are lora, gralora, hybrid")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got rank={rank!r}")
    if width is not None and rank > width:
        raise ValueError(f"rank={rank} exceeds the model width n_embd={width}: no update of a layer that is "
                         f"{width} wide has a rank above {width}")
    if method == "lora":
        return rank, 1, 0
    hybrid_r = (rank // 2 if hybrid_r is None else hybrid_r) if method == "hybrid" else 0
    if method == "hybrid" and not 0 < hybrid_r < rank:
        raise ValueError(f"hybrid needs 0 < hybrid_r < rank (a LoRA part, GraLoRA blocks), got hybrid_r={hybrid_r}")
    r = rank - hybrid_r
    k = (2 if r < 64 else 4) if k is None else k
    if not isinstance(k, int) or k < 1 or r % k:
        why = "is not divisible by" if isinstance(k, int) and k >= 1 else "needs a positive integer k, got"
        raise ValueError(f"GraLoRA rank r={r} (method={method}, rank={rank}) {why} k={k!r}")
    if width is not None and width % k:
        raise ValueError(f"model width n_embd={width} is not divisible by k={k}")
    return r, k, hybrid_r


def plan_runs(methods, ranks, seeds, ks=None, hybrid_r=None, hybrid_max_r=16, width=None):
    """Every run as (method, rank, k, hybrid_r, seed), validated before any training starts (ValueError naming
    the numbers). base runs once (no seed), fft once per seed (no rank), the adapter methods once per rank, k
    and seed, hybrid only at ranks up to hybrid_max_r. A repeated value counts once."""
    methods, ranks, seeds = dict.fromkeys(methods), dict.fromkeys(ranks), dict.fromkeys(seeds)
    runs = [("base", None, None, None, None)] if "base" in methods else []
    for seed in seeds:
        runs += [("fft", None, None, None, seed)] if "fft" in methods else []
        for rank, method in itertools.product(ranks, ("lora", "gralora", "hybrid")):
            if method not in methods or (method == "hybrid" and rank > hybrid_max_r):
                continue
            for k in [None] if method == "lora" or ks is None else dict.fromkeys(ks):
                adapter_spec(method, rank, k, hybrid_r, width)  # raises ValueError if impossible
                runs.append((method, rank, k, hybrid_r if method == "hybrid" else None, seed))
    return runs


def adapter_flops_per_token(model):
    """Forward matmul FLOPs of all adapter paths for one token (gralora.adapter_flops, summed)."""
    return sum(gralora.adapter_flops(1, layer.base.in_features, layer.base.out_features, layer.r, layer.k,
                                     layer.hybrid_r) for _, layer in gralora.adapter_layers(model))


def finetune(base_state, method, rank=None, k=None, hybrid_r=None, seed=0, preset="cpu", device="cpu",
             log=print_now):
    """Fine-tune the base model with one method, then measure it. `base` only measures.

    Args:
        base_state: the pretrained state dict (from `pretrain`).
        method: "base", "fft", "lora", "gralora" or "hybrid".
        rank, k, hybrid_r: the adapter's trainable-parameter budget as a LoRA rank, and overrides of the
            paper's k and hybrid_r (adapter methods only; see `adapter_spec`).
        seed: adapter initialisation and batch order; the same seed gives every method the same batches.
        preset: a name in PRESETS or a Preset (to change its configs, use dataclasses.replace).

    Returns:
        dict(method, r, k, hybrid_r, seed, trainable_params, val_loss, pass_at_1, seconds, lr, rank_budget,
        adapter_flops_per_token, diverged, curve, model): r, k, hybrid_r as built (None for base and fft); seconds
        of training; lr the peak rate; curve lists (step, train_loss, val_loss). A non-finite training loss stops
        the run: diverged is True, val_loss and pass_at_1 are None.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    cfg, lr = preset.train, preset.train.lr_for(method)  # lr_for refuses an unknown method
    tokenizer, tasks = CharTokenizer(), tasks_for(cfg)
    train_examples, val_examples = encode_tasks(tasks.train, tokenizer), encode_tasks(tasks.val, tokenizer)
    torch.manual_seed(seed)  # the adapters' initialisation
    model = GPT(preset.gpt).to(device)
    model.load_state_dict(base_state)
    r = spec_k = spec_h = None
    if method in ("lora", "gralora", "hybrid"):
        r, spec_k, spec_h = adapter_spec(method, rank, k, hybrid_r, preset.gpt.n_embd)
        gralora.add_adapters(model, TARGETS, method=method, r=r, k=spec_k, hybrid_r=spec_h)
    params = [p for p in model.parameters() if p.requires_grad] if method != "base" else []
    gen = torch.Generator().manual_seed(seed)  # batch order: the same for every method at this seed

    def next_batch():
        picks = torch.randint(len(train_examples), (cfg.finetune_batch,), generator=gen).tolist()
        return collate([train_examples[i] for i in picks], device)

    curve, diverged, start = [], False, time.time()
    try:
        if method != "base":
            curve = _optimize(model, params, lr, 0.0, cfg.finetune_steps, next_batch, cfg,
                              lambda: completion_loss(model, val_examples, device), log, f"{method} r={rank}")
    except Diverged as err:
        log(str(err))
        diverged = True
    return dict(
        method=method, r=r, k=spec_k, hybrid_r=spec_h, seed=seed if method != "base" else None,
        trainable_params=sum(p.numel() for p in params), seconds=time.time() - start,
        val_loss=None if diverged else completion_loss(model, val_examples, device),
        pass_at_1=None if diverged else pass_at_1(model, tasks.test, tokenizer),
        lr=lr, rank_budget=None if r is None else r + spec_h, adapter_flops_per_token=adapter_flops_per_token(model),
        diverged=diverged, curve=curve, model=model,
    )
