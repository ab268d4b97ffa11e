"""GraLoRA and LoRA in one small file: layers, model helpers and cost accounting.

A reference implementation of
  * LoRA:   Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685
  * GraLoRA: Jung et al., "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
    Fine-Tuning", arXiv 2505.20355 (NeurIPS 2025)
written to be read. It imports only torch.

Shape vocabulary, used in every comment below:
    T  tokens (all leading dims of the input, flattened)   N  in_features    M  out_features
    r  adapter rank                                        k  blocks per side (GraLoRA)
    s = r / k  rank of one block (s means nothing else)    n = N / k, m = M / k: block sizes

LoRA (Hu et al., Eq. 3) freezes the base weight W0 (M, N) and learns a low-rank update

    y = W0 x + scaling * B (A x),   A: (r, N) Kaiming-uniform,  B: (M, r) zeros,  scaling = alpha / r

so the update dW = scaling * B A starts at zero and has rank at most r.

GraLoRA (Jung et al., Sec. 4) cuts x into k input slices x_j (n each) and y into k output slices
y_i (m each), and gives every block (i, j) of dW its own small LoRA of rank s = r / k:

                  input slices x_0 .. x_{k-1}  (n = N/k each)
                 +-------------+-------------+-------------+
     output  y_0 | B00 @ A00   | B01 @ A01   | B02 @ A02   |      A_ij: (s, n)
     slices  y_1 | B10 @ A10   | B11 @ A11   | B12 @ A12   |      B_ij: (m, s)
    (m each) y_2 | B20 @ A20   | B21 @ A21   | B22 @ A22   |      s = r / k
                 +-------------+-------------+-------------+      (picture: k = 3)

    y_i = W0_i x + scaling * sum_j B_ij (A_ij x_j)                       (paper Eq. 6)

Why (paper Sec. 3): LoRA's gradient dL/dB = (dL/dy) x^T A^T sums over every input channel, so one
outlier input channel c (common in LLM activations) inflates the update of all of B, hence of every
output; in full fine-tuning, dL/dW = (dL/dy) x^T, it inflates only column c. In GraLoRA dL/dB_ij and
dL/dA_ij see only x_j, so only the k blocks (i, j) whose slice j holds c see the outlier.

Costs, per layer, with T tokens (paper Sec. 4.2 and App. C):
  * parameters: k^2 * s * (n + m) = r * (N + M), the same as LoRA whatever k;
  * matmul FLOPs: 2 * T * r * (N + M), the same as LoRA; counting additions exactly, GraLoRA
    needs (k - 1) * r * T fewer than LoRA (each block sums over n = N/k inputs, not N);
  * latent (the values kept for backward between A and B): T * k * r instead of T * r;
  * rank: dW can reach rank k * r, but each block has rank <= s = r / k, so a dense rank-r update is generally
    NOT representable when k > 1; Hybrid GraLoRA (paper Sec. 4.3) adds a plain LoRA of rank hybrid_r for that.
"""

import fnmatch
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

# Layers -----------------------------------------------------------------------------------------------------------


def _dims(module):
    """(N, M) of an nn.Linear, or of Hugging Face's Conv1D (GPT-2's c_attn, c_proj, c_fc), recognised without
    importing transformers: y = x @ weight + bias, weight stored transposed, (N, M), and nf = M. Else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1]):
        return tuple(weight.shape)
    return None


def _check_args(r, k=1, alpha=None, dropout=0.0, hybrid_r=0):
    """Checks that need no layer; errors name the value. A bool is no integer here (True would mean 1)."""
    for name, value, least in (("r", r, 1), ("k", k, 1), ("hybrid_r", hybrid_r, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            kind = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be a {kind} integer, got {name}={value!r}")
    if alpha is not None and (not isinstance(alpha, numbers.Real) or isinstance(alpha, bool)):
        raise ValueError(f"alpha must be a number (or None: 2 * (r + hybrid_r)), got alpha={alpha!r}")
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}")


def _check_fit(base, r, k=1, hybrid_r=0):
    """Checks that need the layer (its type, sizes k divides, ranks it can use); returns (N, M). A block
    (M/k, N/k) can use its rank r/k only while r <= min(N, M), the bound on LoRA's B A and the hybrid's too."""
    if _dims(base) is None:
        raise ValueError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
    N, M = _dims(base)
    for name, size in (("in_features", N), ("out_features", M), ("r", r)):
        if size % k:
            raise ValueError(f"{name}={size} is not divisible by k={k}")
    for name, rank in (("r", r), ("hybrid_r", hybrid_r)):
        if rank > min(N, M):
            per_block = f", {min(N, M) // k} per block at k={k}" if name == "r" and k > 1 else ""
            raise ValueError(f"{name}={rank} is more than a layer with in_features={N}, out_features={M} can use "
                             f"(rank at most {min(N, M)}{per_block}): a larger rank only adds parameters")
    return N, M


def _upcast(t):
    """Half-precision factors are multiplied in float32; float32/64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class AdapterLinear(nn.Module):
    """What LoRALinear and GraLoRALinear share: a frozen `base` (nn.Linear or Conv1D), the checked arguments (k = 1,
    hybrid_r = 0 for LoRA), scaling = alpha / (r + hybrid_r), and an update path. Subclasses create their factors with
    _new_factors() and define adapter(x) (the update's output, scaling included) and delta_weight() (the same update
    as an (M, N) matrix). Merging is explicit: train()/eval() never merge."""

    def __init__(self, base, r, alpha=None, dropout=0.0, k=1, hybrid_r=0):
        super().__init__()
        _check_args(r, k, alpha, dropout, hybrid_r)
        self.in_features, self.out_features = _check_fit(base, r, k, hybrid_r)  # N, M
        self.base = base.requires_grad_(False)
        self.r, self.k, self.hybrid_r = r, k, hybrid_r
        self.alpha = 2 * (r + hybrid_r) if alpha is None else alpha
        self.scaling = self.alpha / (r + hybrid_r)
        self.dropout, self.merged = dropout, False

    def _new_factors(self, a_shape, b_shape):
        """New (A, B) on the base weight's device and dtype: A Kaiming-uniform(a=sqrt(5)) like nn.Linear's
        weight, each trailing 2-D block on its own (fan_in = its width); B zero, so dW = 0 at start."""
        factory = dict(device=self.base.weight.device, dtype=self.base.weight.dtype)
        A = nn.Parameter(torch.empty(a_shape, **factory))
        for block in A.data.view(-1, *a_shape[-2:]):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        return A, nn.Parameter(torch.zeros(b_shape, **factory))

    def forward(self, x):
        y = self.base(x)  # (..., M)
        if self.merged:  # dW already lives in base.weight
            return y
        x = F.dropout(x, self.dropout, self.training)  # on the adapter path only
        return y + self.adapter(x.to(self.A.dtype)).to(y.dtype)

    def _delta_as_base(self):
        """dW in the base weight's dtype and layout: (M, N) for nn.Linear, (N, M) for Conv1D."""
        dW = self.delta_weight().to(self.base.weight.dtype)  # (M, N)
        return dW if isinstance(self.base, nn.Linear) else dW.t()

    @property
    def weight(self):
        """The base weight with dW folded in, for code that reads .weight instead of calling the module (as
        nn.MultiheadAttention reads out_proj.weight). Gradients reach A and B through it; dropout cannot apply."""
        if self.merged:
            return self.base.weight
        if self.training and self.dropout > 0:  # not AttributeError: nn.Module would hide the message
            raise RuntimeError(f"this {type(self).__name__}'s weight is read directly, bypassing forward(), "
                               f"so its dropout={self.dropout} cannot be applied; adapt it with dropout=0")
        return self.base.weight + self._delta_as_base()

    @property
    def bias(self):
        return self.base.bias

    def extra_repr(self):
        return (f"r={self.r}, k={self.k}, hybrid_r={self.hybrid_r}, alpha={self.alpha}, dropout={self.dropout}, "
                f"merged={self.merged}")

    @torch.no_grad()
    def merge(self):
        """Fold dW into base.weight, so inference costs one plain Linear. Idempotent."""
        if not self.merged:
            self.base.weight += self._delta_as_base()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take dW back out of base.weight. Exact up to float rounding in float32/64; in bf16/fp16
        the merged weight was rounded to 8 or 11 bits, so W0 comes back only to that precision."""
        if self.merged:
            self.base.weight -= self._delta_as_base()
            self.merged = False


class LoRALinear(AdapterLinear):
    """y = base(x) + scaling * B (A dropout(x)).  A: (r, N), B: (M, r), scaling = alpha / r.

    Args:
        base: the nn.Linear (or transformers Conv1D) being adapted, frozen here (requires_grad=False).
        r: adapter rank, at most min(N, M): B A never has a higher rank.
        alpha: scaling numerator; default 2 * r, as in the GraLoRA paper's experiments.
        dropout: dropout probability on the adapter's input, applied only in training.
    """

    def __init__(self, base, r, alpha=None, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.A, self.B = self._new_factors((r, self.in_features), (self.out_features, r))  # (r, N), (M, r)

    def adapter(self, x):
        """The update path alone: scaling * B A x, for x of shape (..., N), scaling folded into the small B."""
        latent = x @ self.A.t()  # (..., r)
        return latent @ (self.scaling * self.B).t()  # (..., M)

    def delta_weight(self):
        """dW = scaling * B A, shape (M, N), computed in float32 (or float64) and returned so."""
        return self.scaling * (_upcast(self.B) @ _upcast(self.A))  # (M, N)


class GraLoRALinear(AdapterLinear):
    """GraLoRA: a k x k grid of rank-s LoRAs (s = r/k) over the blocks of W0, plus an optional plain
    LoRA of rank hybrid_r beside them (Hybrid GraLoRA, paper Sec. 4.3).

    Parameters (indexed [i, j] = [output block, input block]):
        A: (k, k, s, n)   A[i, j] reads input slice j     (s = r/k, n = N/k)
        B: (k, k, m, s)   B[i, j] writes output slice i   (m = M/k)
        hybrid_A: (hybrid_r, N), hybrid_B: (M, hybrid_r)  only when hybrid_r > 0
    so block (i, j) of delta_weight() is scaling * B[i, j] @ A[i, j].

    Args:
        base: the frozen nn.Linear (or transformers Conv1D) being adapted.
        r: GraLoRA rank (the rank a LoRA of equal parameter count would have); k must divide it, and it
            is at most min(N, M), so that each block's rank s fits its (m, n) block.
        k: blocks per side. The paper uses k = 2 at r = 16, 32 and k = 4 at r = 64, 128.
        alpha: scaling numerator; default 2 * (r + hybrid_r). scaling = alpha / (r + hybrid_r),
            as in Hugging Face PEFT's GraLoRA, so checkpoints carry over between the two.
        dropout: dropout probability on the adapter's input, applied only in training.
        hybrid_r: rank of the extra plain-LoRA part (0 = pure GraLoRA), ON TOP of r as in PEFT: trainable
            parameters are (r + hybrid_r) * (N + M). The paper's own scripts pass the total rank as r and
            subtract hybrid_r from it: to copy their settings, use r = their r - hybrid_r.

    To use this layer alone, copy _dims, _check_args, _check_fit, _upcast, AdapterLinear and
    this class (everything above it but LoRALinear).
    """

    def __init__(self, base, r, k=2, alpha=None, dropout=0.0, hybrid_r=0):
        super().__init__(base, r, alpha, dropout, k, hybrid_r)
        N, M, s = self.in_features, self.out_features, r // k
        self.A, self.B = self._new_factors((k, k, s, N // k), (k, k, M // k, s))  # (k, k, s, n), (k, k, m, s)
        if hybrid_r > 0:
            self.hybrid_A, self.hybrid_B = self._new_factors((hybrid_r, N), (M, hybrid_r))

    def adapter(self, x):
        """The update path alone, for x of shape (..., N): paper Eq. 6 as two einsums, then the hybrid LoRA;
        scaling folded into the small B factors rather than multiplying the (..., M) output."""
        k, _, s, n = self.A.shape
        x_blocks = x.unflatten(-1, (k, n))  # (..., k, n): x_blocks[..., j, :] = x_j
        latent = torch.einsum("...jn,ijsn->...ijs", x_blocks, self.A)  # (..., k, k, s): [.., i, j, :] = A_ij x_j
        y_blocks = torch.einsum("...ijs,ijms->...im", latent, self.scaling * self.B)  # (..., k, m): [.., i, :] = y_i
        if self.hybrid_r > 0:  # a plain LoRA on the whole x, its output cut into the same k slices
            hybrid = (x @ self.hybrid_A.t()) @ (self.scaling * self.hybrid_B).t()  # (..., M)
            y_blocks = hybrid.unflatten(-1, (k, -1)) + y_blocks  # (..., k, m), laid out like hybrid
        return y_blocks.flatten(-2)  # (..., M): output slices side by side

    def delta_weight(self):
        """dW, shape (M, N), computed in float32 (or float64): block (i, j) = scaling * B_ij A_ij."""
        A, B = _upcast(self.A), _upcast(self.B)
        k, _, m, s = B.shape
        n = A.shape[-1]
        blocks = torch.einsum("ijms,ijsn->ijmn", B, A)  # (k, k, m, n): blocks[i, j] = B_ij A_ij
        dW = blocks.permute(0, 2, 1, 3).reshape(k * m, k * n)  # (M, N): row block i, column block j
        if self.hybrid_r > 0:
            dW = dW + _upcast(self.hybrid_B) @ _upcast(self.hybrid_A)  # (M, N)
        return self.scaling * dW


# Model-level helpers: wrap, freeze, count, save/load, merge -------------------------------------------------------


def _matches(name, patterns):
    """A module name matches a pattern that equals it or its tail ("c_attn" matches "h.0.attn.c_attn"),
    as a glob, anchored at a dot or not ("mlp.*" matches "h.0.mlp.c_fc")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
               or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def _select(model, targets):
    """Names of the nn.Linear / Conv1D modules that `targets` match, after the checks that need only the
    model: no match at all, a layer that already holds an adapter, a weight tied to another module."""
    adapted = {name for name, _ in adapter_layers(model)}
    inside = {f"{name}.base": name for name in adapted}
    matched = [(name, mod) for name, mod in model.named_modules() if name and _matches(name, targets)]
    again = sorted({inside.get(name, name) for name, _ in matched if name in adapted or name in inside})
    if again:
        raise ValueError(f"targets={targets} match layers that already hold an adapter: {again}; "
                         "a layer takes one adapter, so leave these out of targets")
    chosen = [name for name, mod in matched if _dims(mod)]
    if not chosen:
        others = [f"{name} ({type(mod).__name__})" for name, mod in matched]
        linears = [name for name, mod in model.named_modules() if _dims(mod) and name not in inside]
        raise ValueError(f"no nn.Linear or Conv1D matches targets={targets}"
                         + (f"; these match but cannot be adapted: {others}" if others else "")
                         + f"; the model's Linear/Conv1D modules are {linears}")
    owners = {}  # a weight tied to another module (an LM head) must not be adapted: merging would change both
    for name, mod in model.named_modules(remove_duplicate=False):  # a module reachable by two names is shared too
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    for name in chosen:
        shared = owners[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            raise ValueError(f"{name}.weight is tied to {[o for o in shared if o != name]}; refusing to adapt it")
    return chosen


def add_adapters(model, targets, method="gralora", r=8, k=None, alpha=None, dropout=0.0, hybrid_r=0):
    """Replace, in place, each nn.Linear (or transformers Conv1D, as in GPT-2) whose module name matches a pattern in
    `targets` with a LoRALinear (method="lora"), a GraLoRALinear (method="gralora", k=2 by default; Hybrid when
    hybrid_r > 0) or a Hybrid GraLoRALinear (method="hybrid", hybrid_r > 0), then freeze every other parameter.
    Returns the wrapped names. A name matches a pattern if it equals it, ends with "." + pattern, or fnmatch-matches
    it: ["c_attn", "mlp.*"] wraps "h.0.attn.c_attn" and "h.0.mlp.c_fc".

    Everything is checked before any layer is replaced, so a ValueError leaves the model as it was. A rank above a
    matched layer's min(in_features, out_features) is an error: the update never reaches it, and a pattern that
    reaches a small layer (a router, a classifier head) is most often a slip.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple, set)) or not targets or not all(isinstance(p, str) and p for p in targets):
        raise ValueError(f"targets must be a module-name pattern or a non-empty list of them, got targets={targets!r}")
    if method not in ("lora", "gralora", "hybrid"):
        raise ValueError(f"method must be 'lora', 'gralora' or 'hybrid', got method={method!r}")
    if method == "lora" and (k not in (None, 1) or hybrid_r != 0):
        raise ValueError(f"k and hybrid_r are GraLoRA options, which method='lora' would ignore (LoRA is k=1, "
                         f"hybrid_r=0); got k={k!r}, hybrid_r={hybrid_r!r}")
    if method == "hybrid" and not (isinstance(hybrid_r, numbers.Integral) and hybrid_r > 0):
        raise ValueError(f"method='hybrid' needs hybrid_r > 0, the rank of its LoRA part; got hybrid_r={hybrid_r!r}")
    k = 1 if method == "lora" else 2 if k is None else k
    _check_args(r, k, alpha, dropout, hybrid_r)
    chosen = _select(model, list(targets))
    for name in chosen:
        try:
            _check_fit(model.get_submodule(name), r, k, hybrid_r)
        except ValueError as err:
            raise ValueError(f"cannot adapt {name}: {err}") from None
    for name in chosen:  # everything is checked: from here on nothing can fail
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        layer = (LoRALinear(base, r, alpha, dropout) if method == "lora"
                 else GraLoRALinear(base, r, k, alpha, dropout, hybrid_r))
        setattr(model.get_submodule(parent), child, layer)
    mark_only_adapters_trainable(model)
    return chosen


def adapter_layers(model):
    """(name, module) for every LoRALinear / GraLoRALinear in the model, found by type."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, AdapterLinear)]


def adapter_parameters(model):
    """(qualified name, parameter) of adapter factors only: each adapter's own, not its base's."""
    return [(f"{name}.{pname}", p) for name, mod in adapter_layers(model)
            for pname, p in mod.named_parameters(recurse=False)]


def mark_only_adapters_trainable(model):
    """requires_grad=True on adapter factors, False on everything else."""
    model.requires_grad_(False)
    for _, p in adapter_parameters(model):
        p.requires_grad_(True)


def count_trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model):
    """The adapter factors only (a few MB, not the whole model), detached, ready for torch.save."""
    if any(mod.merged for _, mod in adapter_layers(model)):
        raise ValueError("adapters are merged into the base weights; call unmerge_adapters(model) before saving")
    return {name: p.detach().clone() for name, p in adapter_parameters(model)}


def load_adapter_state_dict(model, state_dict):
    """Load factors saved by adapter_state_dict into a model wrapped the same way (same targets,
    method, r, k, hybrid_r). Raises ValueError on any missing, unexpected or mis-shaped tensor."""
    params = dict(adapter_parameters(model))
    missing = sorted(params.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - params.keys())
    wrong = [f"{name}: saved {tuple(state_dict[name].shape)} vs model {tuple(p.shape)}"
             for name, p in params.items() if name in state_dict and state_dict[name].shape != p.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter state dict does not fit this model: missing={missing}, "
                         f"unexpected={unexpected}, shape mismatches={wrong}")
    if any(mod.merged for _, mod in adapter_layers(model)):
        raise ValueError("adapters are merged; call unmerge_adapters(model) before loading new factors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


def merge_adapters(model):
    """Fold every adapter into its base weight (inference at the base model's cost)."""
    for _, mod in adapter_layers(model):
        mod.merge()


def unmerge_adapters(model):
    for _, mod in adapter_layers(model):
        mod.unmerge()


# Hugging Face PEFT interoperability (peft.tuners.gralora; r, hybrid_r and alpha mean the same) -------------------
# PEFT stores one A and one B per input / output slice, with the block index folded into the rank:
#   gralora_A: (k, n, r)  gralora_A[j, :, i*s:(i+1)*s] = A[i, j].T
#   gralora_B: (k, r, m)  gralora_B[i, j*s:(j+1)*s, :] = B[i, j].T
# and the hybrid part as the weights of two bias-free Linears.


def to_peft_gralora(layer):
    """A GraLoRALinear's factors in PEFT's layout (keys as in PEFT's adapter state dict, minus the prefix)."""
    k, _, s, n = layer.A.shape
    m = layer.B.shape[2]
    out = {
        "gralora_A": layer.A.detach().permute(1, 3, 0, 2).reshape(k, n, k * s).clone(),  # (j, n, i*s)
        "gralora_B": layer.B.detach().permute(0, 1, 3, 2).reshape(k, k * s, m).clone(),  # (i, j*s, m)
    }
    if layer.hybrid_r > 0:
        out["gralora_A_general.weight"] = layer.hybrid_A.detach().clone()  # (hybrid_r, N)
        out["gralora_B_general.weight"] = layer.hybrid_B.detach().clone()  # (M, hybrid_r)
    return out


def load_peft_gralora(layer, tensors):
    """Inverse of to_peft_gralora: copy PEFT-layout factors into a GraLoRALinear of the same
    r, k and hybrid_r (ValueError on a shape mismatch, or on a merged layer)."""
    if not isinstance(layer, GraLoRALinear):
        raise ValueError(f"layer must be a GraLoRALinear, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError("unmerge the layer before loading factors into it: its merged dW would be lost")
    k, _, s, n = layer.A.shape
    m = layer.B.shape[2]
    expected = {key: tuple(t.shape) for key, t in to_peft_gralora(layer).items()}
    got = {key: tuple(t.shape) for key, t in tensors.items()}
    if got != expected:
        raise ValueError(f"PEFT tensors {got} do not fit this layer (r={layer.r}, k={k}, "
                         f"hybrid_r={layer.hybrid_r}), which expects {expected}")
    with torch.no_grad():
        layer.A.copy_(tensors["gralora_A"].reshape(k, n, k, s).permute(2, 0, 3, 1))  # (i, j, s, n)
        layer.B.copy_(tensors["gralora_B"].reshape(k, k, s, m).permute(0, 1, 3, 2))  # (i, j, m, s)
        if layer.hybrid_r > 0:
            layer.hybrid_A.copy_(tensors["gralora_A_general.weight"])
            layer.hybrid_B.copy_(tensors["gralora_B_general.weight"])


# Parity accounting (paper Sec. 4.2, Table 1 and App. C). k = 1 is LoRA. -------------------------------------------


def adapter_params(in_features, out_features, r, k=1, hybrid_r=0):
    """Trainable parameters of one adapted layer: k^2 blocks * s * (n + m) = r * (N + M)."""
    N, M, s = in_features, out_features, r // k
    return k * k * s * (N // k + M // k) + hybrid_r * (N + M)


def adapter_flops(tokens, in_features, out_features, r, k=1, hybrid_r=0, exact=False):
    """Forward FLOPs of the adapter path for `tokens` tokens (backward costs twice this).

    exact=False: the usual matmul count, 2 FLOPs per multiply-add: 2 * T * r * (N + M), whatever k.
    exact=True: the paper's App. C count, where a dot product of length L costs L multiplies and L - 1 additions.
    Down-projection: k^2 blocks * T * s * (2n - 1) = T * r * (2N - k); up-projection: T * M * (2r - 1), as every
    output sums r latent values in both methods. So GraLoRA needs (k - 1) * r * T fewer than LoRA. The hybrid part
    adds a LoRA's count plus T * M to add its output to the blocks'. Scaling and the base layer are not counted.
    """
    T, N, M = tokens, in_features, out_features
    if not exact:
        return 2 * T * (r + hybrid_r) * (N + M)
    flops = T * r * (2 * N - k) + T * M * (2 * r - 1)
    if hybrid_r > 0:
        flops += T * hybrid_r * (2 * N - 1) + T * M * (2 * hybrid_r - 1) + T * M
    return flops


def adapter_latent(tokens, r, k=1, hybrid_r=0):
    """Values between A and B kept for backward: T * k * r for GraLoRA (T * r for LoRA)."""
    return tokens * (k * r + hybrid_r)
