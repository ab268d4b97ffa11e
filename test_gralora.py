"""Tests for gralora.py: every claim the module's docstring makes, checked against an oracle.

    python -m pytest -q test_gralora.py

Every test runs in float64, torch's default dtype here (conftest's `float64` fixture), so exactness claims
(block loop, k = 1 is LoRA, merge = unmerged) are checked to ~1e-12; the half-precision test names its dtype.
FLOPs are measured with torch.utils.flop_counter, the latent with autograd's saved-tensor hooks.
Everything is small, seeded and runs on the CPU in a few seconds.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import gralora
from conftest import randomize_B
from gralora import GraLoRALinear, LoRALinear

pytestmark = pytest.mark.usefixtures("float64")

SHAPES = [  # (N, M, r, k)
    (8, 8, 4, 2),
    (12, 20, 8, 4),
    (16, 6, 6, 2),
    (24, 48, 12, 3),
    (32, 32, 16, 4),
]


def make(N, M, r, k=1, hybrid_r=0, dtype=None, random_B=True, seed=0, **kw):
    """A GraLoRALinear (or LoRALinear when k is None) with non-zero B, so dW != 0."""
    torch.manual_seed(seed)
    base = nn.Linear(N, M, dtype=dtype)
    layer = LoRALinear(base, r, **kw) if k is None else GraLoRALinear(base, r, k=k, hybrid_r=hybrid_r, **kw)
    return randomize_B(layer, seed) if random_B else layer


def block_loop(layer, x):
    """Oracle: y_i = W0_i x + scaling * sum_j B_ij (A_ij x_j), one block at a time, no einsum."""
    k, n, m = layer.k, layer.base.in_features // layer.k, layer.base.out_features // layer.k
    ys = []
    for i in range(k):
        y_i = 0
        for j in range(k):
            x_j = x[..., j * n:(j + 1) * n]
            y_i = y_i + x_j @ layer.A[i, j].T @ layer.B[i, j].T
        ys.append(y_i)
    delta = torch.cat(ys, dim=-1)
    if layer.hybrid_r:
        delta = delta + x @ layer.hybrid_A.T @ layer.hybrid_B.T
    return layer.base(x) + layer.scaling * delta


# ---------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("N,M,r,k", SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 4)])
@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_forward_equals_block_loop(N, M, r, k, lead, hybrid_r):
    layer = make(N, M, r, k, hybrid_r=hybrid_r)
    x = torch.randn(*lead, N)
    y = layer(x)
    assert y.shape == (*lead, M) and y.dtype == torch.float64  # the float64 fixture is in force
    torch.testing.assert_close(y, block_loop(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,M,r,k", SHAPES)
def test_delta_weight_blocks(N, M, r, k):
    """Block (i, j) of delta_weight() is scaling * B[i, j] @ A[i, j], and x @ dW.T is the update."""
    layer = make(N, M, r, k)
    dW = layer.delta_weight()
    n, m = N // k, M // k
    for i in range(k):
        for j in range(k):
            block = dW[i * m:(i + 1) * m, j * n:(j + 1) * n]
            torch.testing.assert_close(block, layer.scaling * layer.B[i, j] @ layer.A[i, j], rtol=0, atol=1e-12)
    x = torch.randn(7, N)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ dW.T, rtol=1e-12, atol=1e-12)


def test_k1_is_lora():
    lora = make(12, 20, 4, k=None)
    gra = make(12, 20, 4, k=1, seed=1)
    with torch.no_grad():
        gra.base.load_state_dict(lora.base.state_dict())
        gra.A[0, 0].copy_(lora.A)
        gra.B[0, 0].copy_(lora.B)
    assert gra.scaling == lora.scaling == 2.0
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(gra(x), lora(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gra.delta_weight(), lora.delta_weight(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [None, 1, 2, 4])
def test_fresh_adapter_leaves_base_unchanged(k):
    layer = make(16, 8, 8, k, random_B=False)
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer.A) > 0  # A is random, only B starts at zero


def test_init_and_defaults():
    layer = GraLoRALinear(nn.Linear(64, 32), r=8, k=4)
    assert layer.A.shape == (4, 4, 2, 16) and layer.B.shape == (4, 4, 8, 2)
    assert layer.alpha == 16 and layer.scaling == 2.0  # alpha = 2 r by default
    bound = 1 / math.sqrt(16)  # Kaiming-uniform(a=sqrt(5)) per block: fan_in = N / k
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.8 * bound
    hyb = GraLoRALinear(nn.Linear(64, 32), r=8, k=2, hybrid_r=4)
    assert hyb.alpha == 24 and hyb.scaling == 2.0  # PEFT semantics: alpha / (r + hybrid_r)
    assert hyb.hybrid_A.shape == (4, 64) and hyb.hybrid_B.shape == (32, 4)
    assert GraLoRALinear(nn.Linear(64, 32), r=8, alpha=4).scaling == 0.5
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_dropout_only_on_adapter_path_and_only_in_training():
    layer = make(16, 16, 4, k=2, dropout=0.5)
    x = torch.randn(64, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), block_loop(layer, x), rtol=1e-12, atol=1e-12)
    fresh = make(16, 16, 4, k=2, dropout=0.5, random_B=False).train()
    assert torch.equal(fresh(x), fresh.base(x))  # the base path never sees dropout


# ---------------------------------------------------------------- parity: params, FLOPs, latent


@pytest.mark.parametrize("N,M,r,k", SHAPES)
@pytest.mark.parametrize("hybrid_r", [0, 4])
def test_param_count(N, M, r, k, hybrid_r):
    layer = make(N, M, r, k, hybrid_r=hybrid_r)
    counted = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert counted == (r + hybrid_r) * (N + M) == gralora.adapter_params(N, M, r, k, hybrid_r)
    assert sum(p.numel() for p in make(N, M, r, None).parameters() if p.requires_grad) == r * (N + M)


def measured_flops(layer, x):
    """Forward and backward FLOPs of the adapter path alone, as torch counts them."""
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fwd:
        y = layer.adapter(x)
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.ones_like(y))
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("N,M,r,k", SHAPES)
@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_flops_measured_equal_lora_and_formula(N, M, r, k, hybrid_r):
    x = torch.randn(3, 7, N)
    T = 21
    gra_fwd, gra_bwd = measured_flops(make(N, M, r, k, hybrid_r=hybrid_r), x)
    loras = [measured_flops(make(N, M, rank, None), x) for rank in (r, hybrid_r) if rank]  # LoRA at r, + the hybrid's
    lora_fwd, lora_bwd = (sum(counts) for counts in zip(*loras))
    assert gra_fwd == lora_fwd == gralora.adapter_flops(T, N, M, r, k, hybrid_r) == 2 * T * (r + hybrid_r) * (N + M)
    assert gra_bwd == lora_bwd == 2 * gra_fwd


def count_ops_block_loop(layer, x):
    """Oracle for the exact count: the adapter computed scalar by scalar, counting every * and +.
    Returns (output, multiplications + additions). Scaling is not counted (as in the paper)."""
    k, n, m, s = layer.k, layer.base.in_features // layer.k, layer.base.out_features // layer.k, layer.r // layer.k
    ops = 0
    out = torch.zeros(x.shape[0], k * m, dtype=x.dtype)
    for t in range(x.shape[0]):
        # down-projection: latent[i][j][c] = sum over the n inputs of block j
        latent = [[[None] * s for _ in range(k)] for _ in range(k)]
        for i in range(k):
            for j in range(k):
                for c in range(s):
                    acc = layer.A[i, j, c, 0] * x[t, j * n]
                    ops += 1
                    for q in range(1, n):
                        acc = acc + layer.A[i, j, c, q] * x[t, j * n + q]
                        ops += 2
                    latent[i][j][c] = acc
        # up-projection: output row o of slice i sums its r = k * s latent products
        for i in range(k):
            for o in range(m):
                terms = [layer.B[i, j, o, c] * latent[i][j][c] for j in range(k) for c in range(s)]
                ops += len(terms) + len(terms) - 1
                out[t, i * m + o] = sum(terms[1:], terms[0])
    return out, ops


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exact_flops_match_scalar_count(k):
    N, M, r, T = 8, 4, 4, 3
    layer = make(N, M, r, k)
    x = torch.randn(T, N)
    out, ops = count_ops_block_loop(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer.scaling * out, layer.adapter(x), rtol=1e-12, atol=1e-12)
    assert ops == gralora.adapter_flops(T, N, M, r, k, exact=True)
    # paper App. C: GraLoRA = LoRA - (k - 1) * r * T
    assert ops == gralora.adapter_flops(T, N, M, r, 1, exact=True) - (k - 1) * r * T


def saved_activation_numel(layer, x):
    """Values autograd keeps for backward that are neither the input nor (copies of) the weights.
    With T chosen as a prime that divides no weight dimension, those are the tensors with T in their shape."""
    T = x.shape[0]
    saved = []
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.adapter(x)
    x_storage = x.untyped_storage().data_ptr()
    return sum(t.numel() for t in saved if T in t.shape and t.untyped_storage().data_ptr() != x_storage)


@pytest.mark.parametrize("N,M,r,k", [(8, 8, 4, 2), (12, 20, 8, 4), (32, 32, 16, 4)])
@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_latent_is_k_times_lora(N, M, r, k, hybrid_r):
    T = 37
    x = torch.randn(T, N)
    assert saved_activation_numel(make(N, M, r, None), x) == T * r == gralora.adapter_latent(T, r)
    got = saved_activation_numel(make(N, M, r, k, hybrid_r=hybrid_r), x)
    assert got == T * (k * r + hybrid_r) == gralora.adapter_latent(T, r, k, hybrid_r)


# ---------------------------------------------------------------- rank and gradients


@pytest.mark.parametrize("N,M,r,k", [(32, 32, 4, 2), (32, 32, 8, 4), (48, 24, 6, 3)])
def test_rank_k_times_r_and_r_over_k_per_block(N, M, r, k):
    layer = make(N, M, r, k)
    dW = layer.delta_weight()
    assert torch.linalg.matrix_rank(dW) == k * r
    n, m = N // k, M // k
    for i in range(k):
        for j in range(k):
            assert torch.linalg.matrix_rank(dW[i * m:(i + 1) * m, j * n:(j + 1) * n]) <= r // k
    assert torch.linalg.matrix_rank(make(N, M, r, None).delta_weight()) == r


def test_gradient_locality():
    """An input that lives only in slice j reaches only the adapters reading slice j (paper Sec. 3.3).
    LoRA's gradient is not so confined: every rank row of A and every column of B gets one, so the
    slice's signal reaches the whole update."""
    N, M, r, k, j = 16, 16, 8, 4, 1
    n = N // k
    x = torch.zeros(10, N)
    x[:, j * n:(j + 1) * n] = torch.randn(10, n)
    layer = make(N, M, r, k)
    layer(x).pow(2).sum().backward()
    for jj in range(k):
        touched = layer.A.grad[:, jj].abs().sum() > 0
        assert touched == (jj == j), f"input block {jj}"
        assert (layer.B.grad[:, jj].abs().sum() > 0) == (jj == j)
    lora = make(N, M, r, None)
    lora(x).pow(2).sum().backward()
    assert (lora.A.grad[:, j * n:(j + 1) * n].abs().sum(1) > 0).all()  # every rank row is touched
    assert (lora.B.grad.abs().sum(0) > 0).all()  # and every B column: the outlier's slice reaches all of B


def test_only_adapter_parameters_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    wrapped = gralora.add_adapters(model, ["0", "2"], method="gralora", r=4, k=2)
    assert wrapped == ["0", "2"]
    model(torch.randn(5, 8)).sum().backward()
    adapter_ids = {id(p) for _, p in gralora.adapter_parameters(model)}
    assert len(adapter_ids) == 4  # A and B of two layers
    for name, p in model.named_parameters():
        is_adapter = id(p) in adapter_ids
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    assert gralora.count_trainable_params(model) == 4 * (8 + 16) + 4 * (16 + 8)


# ---------------------------------------------------------------- merge, precision, save/load


@pytest.mark.parametrize("k,hybrid_r", [(None, 0), (2, 0), (4, 0), (2, 4)])
def test_merge_unmerge_exact_and_idempotent(k, hybrid_r):
    layer = make(16, 24, 8, k, hybrid_r=hybrid_r)
    x = torch.randn(3, 5, 16)
    W0, y0, dW = layer.base.weight.clone(), layer(x), layer.delta_weight()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, W0 + dW, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)
    layer.merge()  # a second merge is a no-op
    torch.testing.assert_close(layer.base.weight, W0 + dW, rtol=0, atol=1e-14)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    layer = make(32, 32, 8, 2, dtype=dtype)
    assert layer.A.dtype == dtype and layer.delta_weight().dtype == torch.float32
    x = torch.randn(4, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = make(32, 32, 8, 2, dtype=torch.float64)  # same seed, same factors, in float64
    with torch.no_grad():
        for p, q in zip(ref.parameters(), layer.parameters()):
            p.copy_(q.double())
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=0.05, atol=0.1)
    torch.testing.assert_close(layer.delta_weight().double(), ref.delta_weight(), rtol=1e-5, atol=1e-5)
    W0 = layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x).double(), ref(x.double()), rtol=0.05, atol=0.1)
    layer.unmerge()  # W0 comes back to the half type's rounding, not exactly (see unmerge's docstring)
    eps = torch.finfo(dtype).eps
    scale = (W0.float().abs() + layer.delta_weight().abs()).max()
    torch.testing.assert_close(layer.base.weight.float(), W0.float(), rtol=0, atol=2 * eps * scale.item())


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "attn": nn.ModuleDict({"c_attn": nn.Linear(16, 48), "c_proj": nn.Linear(16, 16)}),
        "mlp": nn.ModuleDict({"c_fc": nn.Linear(16, 64), "c_proj": nn.Linear(64, 16)}),
    })


def run(model, x):
    h = model["attn"]["c_proj"](model["attn"]["c_attn"](x)[..., :16])
    return model["mlp"]["c_proj"](model["mlp"]["c_fc"](h).relu())


@pytest.mark.parametrize("method,kw", [("lora", {}), ("gralora", {"k": 2}), ("gralora", {"k": 4, "hybrid_r": 4})])
def test_save_load_and_merge_all(method, kw):
    model = tiny_model()
    names = gralora.add_adapters(model, ["c_attn", "c_proj", "mlp.*"], method=method, r=8, **kw)
    assert names == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    randomize_B(model)
    x = torch.randn(3, 16)
    y = run(model, x)
    sd = gralora.adapter_state_dict(model)
    assert sum(t.numel() for t in sd.values()) == gralora.count_trainable_params(model)
    assert all(".base." not in key for key in sd)

    other = tiny_model()  # same base weights, fresh adapters
    gralora.add_adapters(other, ["c_attn", "c_proj", "mlp.*"], method=method, r=8, **kw)
    assert not torch.allclose(run(other, x), y)
    gralora.load_adapter_state_dict(other, sd)
    torch.testing.assert_close(run(other, x), y)

    gralora.merge_adapters(other)
    assert all(mod.merged for _, mod in gralora.adapter_layers(other))
    torch.testing.assert_close(run(other, x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="merged"):
        gralora.adapter_state_dict(other)
    gralora.unmerge_adapters(other)
    torch.testing.assert_close(run(other, x), y, rtol=1e-12, atol=1e-12)


def test_load_mismatch_errors():
    model = tiny_model()
    gralora.add_adapters(model, ["c_fc"], method="gralora", r=8, k=2)
    sd = gralora.adapter_state_dict(model)
    wrong_k = tiny_model()
    gralora.add_adapters(wrong_k, ["c_fc"], method="gralora", r=8, k=4)
    with pytest.raises(ValueError, match=r"mlp\.c_fc\.A: saved \(2, 2, 4, 8\) vs model \(4, 4, 2, 4\)"):
        gralora.load_adapter_state_dict(wrong_k, sd)
    more = tiny_model()
    gralora.add_adapters(more, ["c_fc", "c_attn"], method="gralora", r=8, k=2)
    with pytest.raises(ValueError, match=r"missing=\['attn\.c_attn\.A', 'attn\.c_attn\.B'\]"):
        gralora.load_adapter_state_dict(more, sd)
    with pytest.raises(ValueError, match=r"unexpected=\['h\.0\.mlp\.c_fc\.A'\]"):
        gralora.load_adapter_state_dict(model, {**sd, "h.0.mlp.c_fc.A": sd["mlp.c_fc.A"]})


def test_helpers_error_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"no nn.Linear or Conv1D matches targets=\['q_proj'\]; "
                                         r"the model's Linear/Conv1D modules are \['attn.c_attn',"):
        gralora.add_adapters(model, ["q_proj"])
    with pytest.raises(ValueError, match="method must be 'lora', 'gralora' or 'hybrid', got method='dora'"):
        gralora.add_adapters(model, ["c_fc"], method="dora")
    tied = nn.ModuleDict({"wte": nn.Embedding(10, 16), "lm_head": nn.Linear(16, 10, bias=False)})
    tied["lm_head"].weight = tied["wte"].weight
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['wte'\]"):
        gralora.add_adapters(tied, ["lm_head"])
    # patterns reach nested modules: a tail, or a glob anchored at a dot
    nested = nn.ModuleDict({"h": nn.ModuleList([tiny_model()])})
    assert gralora.add_adapters(nested, ["mlp.*", "attn.c_attn"], r=4) == [
        "h.0.attn.c_attn", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    # a layer that cannot take the adapter leaves the model as it was (no half-wrapped model)
    odd = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(6, 16)})
    with pytest.raises(ValueError, match=r"cannot adapt b: in_features=6 is not divisible by k=4"):
        gralora.add_adapters(odd, ["a", "b"], r=4, k=4)
    assert type(odd["a"]) is nn.Linear and all(p.requires_grad for p in odd.parameters())
    # a module that matches but is not a Linear is named, with its type
    conv = nn.ModuleDict({"c_attn": nn.Conv2d(4, 4, 1), "lm_head": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"these match but cannot be adapted: \['c_attn \(Conv2d\)'\]"):
        gralora.add_adapters(conv, ["c_attn"])


def test_wrapping_twice_is_refused():
    """A second call that reaches an adapted layer (or the frozen base inside it) names the layer."""
    model = tiny_model()
    gralora.add_adapters(model, ["c_fc"], r=4)
    for targets in (["c_fc"], ["*base"], ["mlp.*"]):
        with pytest.raises(ValueError, match=r"already hold an adapter: \['mlp.c_fc'\]"):
            gralora.add_adapters(model, targets, r=4)
    assert type(model["mlp"]["c_proj"]) is nn.Linear  # nothing was wrapped by the refused calls
    assert gralora.add_adapters(model, ["attn.*"], r=4) == ["attn.c_attn", "attn.c_proj"]  # other layers: fine


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=None), r"targets must be a module-name pattern or a non-empty list of them, got targets=None"),
    (dict(targets=[]), r"got targets=\[\]"),
    (dict(targets=["c_fc", 3]), r"got targets=\['c_fc', 3\]"),
    (dict(method="lora", hybrid_r=4), r"GraLoRA options, which method='lora' would ignore .*; got k=None, hybrid_r=4"),
    (dict(method="lora", k=4), r"GraLoRA options, which method='lora' would ignore .*; got k=4, hybrid_r=0"),
    (dict(method="hybrid"), r"method='hybrid' needs hybrid_r > 0, the rank of its LoRA part; got hybrid_r=0"),
    (dict(method="hybrid", hybrid_r=-2), r"method='hybrid' needs hybrid_r > 0.*; got hybrid_r=-2"),
    (dict(r=0), r"r must be a positive integer, got r=0"),
    (dict(k=3), r"cannot adapt mlp.c_fc: in_features=16 is not divisible by k=3"),
    (dict(r=32), r"cannot adapt mlp.c_fc: r=32 is more than a layer with in_features=16, out_features=64 can use"),
    (dict(alpha="16"), r"alpha must be a number .*, got alpha='16'"),
])
def test_add_adapters_bad_arguments(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        gralora.add_adapters(model, **{"targets": ["c_fc"], **kwargs})
    assert not gralora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    assert gralora.add_adapters(tiny_model(), ["c_fc"], method="lora", k=1, r=4) == ["mlp.c_fc"]  # k=1 is LoRA


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), r"r must be a positive integer, got r=0"),
    (dict(r=-4), r"r must be a positive integer, got r=-4"),
    (dict(r=4, k=0), r"k must be a positive integer, got k=0"),
    (dict(r=4, k=-2), r"k must be a positive integer, got k=-2"),
    (dict(r=4, hybrid_r=-1), r"hybrid_r must be a non-negative integer, got hybrid_r=-1"),
    (dict(r=6, k=4), r"r=6 is not divisible by k=4"),
    (dict(r=4, k=4, in_features=30), r"in_features=30 is not divisible by k=4"),
    (dict(r=4, k=4, out_features=18), r"out_features=18 is not divisible by k=4"),
    (dict(r=4.0), r"r must be a positive integer, got r=4.0"),
    (dict(r=True), r"r must be a positive integer, got r=True"),
    (dict(r=4, dropout=1.0), r"dropout must be a probability in \[0, 1\), got dropout=1.0"),
    (dict(r=4, dropout=-0.1), r"dropout must be a probability in \[0, 1\), got dropout=-0.1"),
    (dict(r=4, alpha="16"), r"alpha must be a number \(or None: 2 \* \(r \+ hybrid_r\)\), got alpha='16'"),
])
def test_bad_arguments(kwargs, message):
    N, M = kwargs.pop("in_features", 16), kwargs.pop("out_features", 16)
    with pytest.raises(ValueError, match=message):
        GraLoRALinear(nn.Linear(N, M), **kwargs)


def test_non_linear_base():
    with pytest.raises(ValueError, match="base must be an nn.Linear or a transformers Conv1D, got Conv1d"):
        GraLoRALinear(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="base must be an nn.Linear or a transformers Conv1D, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="r must be a positive integer, got r=0"):
        LoRALinear(nn.Linear(4, 4), r=0)


@pytest.mark.parametrize("N,M,k", [(16, 16, 1), (16, 6, 2), (24, 48, 4)])
def test_rank_bound_is_the_smaller_side(N, M, k):
    """r = min(N, M) is accepted, and the update reaches that rank (each (M/k, N/k) block its full rank r/k),
    so the bound is not too strict; the next r that k divides is refused, naming r, in_features, out_features."""
    top = min(N, M)
    layer = make(N, M, top, k if k > 1 else None)
    dW = layer.delta_weight()
    assert torch.linalg.matrix_rank(dW) == top
    m, n = M // k, N // k
    assert all(torch.linalg.matrix_rank(dW[i * m:(i + 1) * m, j * n:(j + 1) * n]) == top // k
               for i in range(k) for j in range(k))
    per_block = f", {top // k} per block at k={k}" if k > 1 else ""
    with pytest.raises(ValueError, match=rf"^r={top + k} is more than a layer with in_features={N}, out_features={M} "
                                         rf"can use \(rank at most {top}{per_block}\): a larger rank only adds"):
        make(N, M, top + k, k if k > 1 else None)


def test_rank_larger_than_the_layer_is_refused():
    """The newcomer's case: LoRA r=64 on a 16 x 16 Linear would train 2,048 parameters for 256 weights."""
    with pytest.raises(ValueError, match=r"r=64 is more than a layer with in_features=16, out_features=16 can use"):
        LoRALinear(nn.Linear(16, 16), r=64)
    with pytest.raises(ValueError, match=r"hybrid_r=12 is more than a layer with in_features=16, out_features=8 can "
                                         r"use \(rank at most 8\)"):
        GraLoRALinear(nn.Linear(16, 8), r=4, k=2, hybrid_r=12)
    model = nn.ModuleDict({"wide": nn.Linear(64, 64), "small": nn.Linear(16, 16)})  # r=64 fits only the first
    with pytest.raises(ValueError, match=r"cannot adapt small: r=64 is more than a layer with in_features=16, "
                                         r"out_features=16 can use"):
        gralora.add_adapters(model, ["wide", "small"], method="lora", r=64)
    assert not gralora.adapter_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_method_hybrid_is_gralora_with_a_lora_part():
    """method="hybrid" builds what method="gralora" builds with the same hybrid_r, and k defaults to 2."""
    models = {}
    for method in ("hybrid", "gralora"):
        models[method] = tiny_model()
        torch.manual_seed(1)
        names = gralora.add_adapters(models[method], ["mlp.*"], method=method, r=4, hybrid_r=4)
        assert names == ["mlp.c_fc", "mlp.c_proj"]
    layers = gralora.adapter_layers(models["hybrid"])
    assert all(isinstance(layer, GraLoRALinear) and (layer.k, layer.hybrid_r) == (2, 4) for _, layer in layers)
    hybrid, plain = (gralora.adapter_state_dict(models[method]) for method in ("hybrid", "gralora"))
    assert hybrid.keys() == plain.keys() and all(torch.equal(hybrid[key], plain[key]) for key in hybrid)
    assert "mlp.c_fc.hybrid_A" in hybrid
    torch.manual_seed(1)
    gralora.add_adapters(tiny_model(), ["mlp.c_fc"], method="hybrid", r=4, k=4, hybrid_r=4)  # k=4: 16 and 64 divide


def test_a_module_reachable_by_two_names_is_refused():
    """One Linear under two names (layer sharing, an alias): named_modules() lists it once, so adapting it would
    wrap one name and leave the other calling the bare layer, whose weight a merge would then change."""
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": shared})
    with pytest.raises(ValueError, match=r"a.weight is tied to \['b'\]; refusing to adapt it"):
        gralora.add_adapters(model, ["a", "b"], method="lora", r=2)
    assert model["a"] is model["b"] is shared and all(p.requires_grad for p in model.parameters())


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    assert GraLoRALinear(nn.Linear(8, 8), r=4, dropout=np.float32(0.25)).dropout == np.float32(0.25)  # a Real
    layer = GraLoRALinear(nn.Linear(8, 8), r=np.int64(4), k=np.int32(2), hybrid_r=np.int64(2))
    assert layer.A.shape == (2, 2, 2, 4) and layer.hybrid_A.shape == (2, 8)


# ---------------------------------------------------------------- Hugging Face PEFT layout


@pytest.mark.parametrize("k,hybrid_r", [(1, 0), (2, 0), (4, 0), (2, 4)])
def test_peft_layout_round_trip(k, hybrid_r):
    src = make(16, 24, 8, k, hybrid_r=hybrid_r)
    dst = make(16, 24, 8, k, hybrid_r=hybrid_r, seed=1)
    dst.base.load_state_dict(src.base.state_dict())
    tensors = gralora.to_peft_gralora(src)
    assert tensors["gralora_A"].shape == (k, 16 // k, 8) and tensors["gralora_B"].shape == (k, 8, 24 // k)
    gralora.load_peft_gralora(dst, tensors)
    x = torch.randn(5, 16)
    assert torch.equal(dst(x), src(x))
    with pytest.raises(ValueError, match="do not fit this layer"):
        gralora.load_peft_gralora(make(16, 24, 8, 2 if k != 2 else 4), tensors)
    dst.merge()
    with pytest.raises(ValueError, match="unmerge the layer before loading"):
        gralora.load_peft_gralora(dst, tensors)
    with pytest.raises(ValueError, match="layer must be a GraLoRALinear, got LoRALinear"):
        gralora.load_peft_gralora(make(16, 24, 8, None), tensors)


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 4)])
def test_same_outputs_as_peft(k, hybrid_r):
    """Carry an adapter to PEFT's GraLoRA tuner and back; both compute the same function."""
    peft = pytest.importorskip("peft")
    ours = make(16, 24, 8, k, hybrid_r=hybrid_r, alpha=12)
    model = nn.Sequential(nn.Linear(16, 24))
    model[0].load_state_dict(ours.base.state_dict())
    config = peft.GraloraConfig(r=8, gralora_k=k, hybrid_r=hybrid_r, alpha=12, target_modules=["0"])
    pmodel = peft.get_peft_model(model, config)
    peft_layer = pmodel.base_model.model[0]
    with torch.no_grad():
        for key, t in gralora.to_peft_gralora(ours).items():
            name, _, sub = key.partition(".")
            target = getattr(peft_layer, name)["default"]
            (getattr(target, sub) if sub else target).copy_(t)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(pmodel(x), ours(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(peft_layer.get_delta_weight("default"), ours.delta_weight(), rtol=1e-12, atol=1e-12)
    back = make(16, 24, 8, k, hybrid_r=hybrid_r, alpha=12, seed=3)
    back.base.load_state_dict(ours.base.state_dict())
    state = {"gralora_A": peft_layer.gralora_A["default"], "gralora_B": peft_layer.gralora_B["default"]}
    if hybrid_r:
        state["gralora_A_general.weight"] = peft_layer.gralora_A_general["default"].weight
        state["gralora_B_general.weight"] = peft_layer.gralora_B_general["default"].weight
    gralora.load_peft_gralora(back, state)
    torch.testing.assert_close(back(x), ours(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- modules that read .weight: nn.TransformerEncoder


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def with_weights(model, reference, x):
    """Oracle: the unwrapped `reference` run with every adapted weight replaced by W0 + dW (in Linear layout
    (M, N), or (N, M) for a Conv1D), through torch.func.functional_call; differentiable in A and B."""
    weights = {}
    for name, layer in gralora.adapter_layers(model):
        dW = layer.delta_weight()  # (M, N)
        weights[f"{name}.weight"] = layer.base.weight + (dW if isinstance(layer.base, nn.Linear) else dW.T)
    return torch.func.functional_call(reference, weights, (x,))


@pytest.mark.parametrize("targets", [["linear1", "linear2"], ["out_proj"], ["linear1", "linear2", "out_proj"]])
@pytest.mark.parametrize("method,kw", [("lora", {}), ("gralora", {"k": 2}), ("gralora", {"k": 4, "hybrid_r": 4})])
def test_transformer_encoder(targets, method, kw, monkeypatch):
    """nn.MultiheadAttention reads out_proj.weight, and the encoder layer's inference fast path reads
    linear1/linear2.weight, without calling the modules: both see W0 + dW, and gradients reach A and B."""
    fast_path, fused = [], torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fast_path.append(1) or fused(*a))
    reference, model = encoder(), encoder()
    gralora.add_adapters(model, targets, method=method, r=8, **kw)
    randomize_B(model)
    x = torch.randn(3, 5, 16)
    # training mode: the slow path, which calls linear1/linear2 but still reads out_proj.weight
    y = model.train()(x)
    torch.testing.assert_close(y, with_weights(model, reference.train(), x), rtol=1e-12, atol=1e-12)
    params = [p for _, p in gralora.adapter_parameters(model)]
    grads = torch.autograd.grad(y.pow(2).sum(), params)
    expected = torch.autograd.grad(with_weights(model, reference, x).pow(2).sum(), params)
    for g, e in zip(grads, expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # eval mode, with and without autograd (without: the fast path that reads .weight)
    model.eval(), reference.eval()
    with torch.no_grad():
        expected = with_weights(model, reference, x)
        fast_path.clear()
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        assert len(fast_path) == 2  # both layers took the fused path
        assert not torch.allclose(reference(x), expected)  # the adapter does change the output
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    gralora.merge_adapters(model)  # merged: .weight is the base weight, which now holds dW
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_weight_read_directly_refuses_dropout_in_training():
    """Adapter dropout acts on the module's input, which code reading .weight never passes through it."""
    model = encoder()
    gralora.add_adapters(model, ["out_proj"], r=4, k=2, dropout=0.1)
    x = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match=r"weight is read directly, bypassing forward\(\), so its dropout=0.1"):
        model.train()(x)
    model.eval()(x)  # no dropout in eval: fine


def test_weight_property_is_not_a_parameter():
    layer = make(8, 8, 4, 2)
    dW = layer.delta_weight()
    torch.testing.assert_close(layer.weight, layer.base.weight + dW, rtol=0, atol=1e-14)
    assert layer.bias is layer.base.bias
    assert sorted(layer.state_dict()) == ["A", "B", "base.bias", "base.weight"]
    assert sorted(n for n, _ in layer.named_parameters()) == ["A", "B", "base.bias", "base.weight"]


# ---------------------------------------------------------------- Hugging Face Conv1D (GPT-2's c_attn, c_proj, c_fc)


class Conv1D(nn.Module):
    """What transformers.pytorch_utils.Conv1D computes: y = x @ weight + bias, weight stored (N, M)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("k,hybrid_r", [(None, 0), (2, 0), (4, 4)])
def test_conv1d_base(k, hybrid_r):
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # N = 16 in, M = 24 out
    W0 = conv.weight.detach().clone()
    layer = LoRALinear(conv, 8) if k is None else GraLoRALinear(conv, 8, k=k, hybrid_r=hybrid_r)
    assert (layer.in_features, layer.out_features) == (16, 24)
    randomize_B(layer)
    x = torch.randn(2, 5, 16)
    dW = layer.delta_weight()  # (M, N), as for an nn.Linear
    y = layer(x)
    torch.testing.assert_close(y, conv(x) + x @ dW.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight, W0 + dW.T, rtol=0, atol=1e-14)  # in Conv1D's (N, M) layout
    layer.merge()
    torch.testing.assert_close(conv.weight, W0 + dW.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, W0, rtol=0, atol=1e-14)


def test_conv1d_model_save_load_merge():
    def model(seed=0):
        torch.manual_seed(seed)
        return nn.ModuleDict({"c_attn": Conv1D(48, 16), "c_proj": Conv1D(16, 16), "mlp": nn.Linear(16, 16)})

    def run(m, x):
        return m["mlp"](m["c_proj"](m["c_attn"](x)[..., :16]))

    src = model()
    assert gralora.add_adapters(src, ["c_attn", "c_proj", "mlp"], r=4, k=2) == ["c_attn", "c_proj", "mlp"]
    randomize_B(src)
    x = torch.randn(3, 16)
    y = run(src, x)
    dst = model()
    gralora.add_adapters(dst, ["c_attn", "c_proj", "mlp"], r=4, k=2)
    gralora.load_adapter_state_dict(dst, gralora.adapter_state_dict(src))
    torch.testing.assert_close(run(dst, x), y, rtol=1e-12, atol=1e-12)
    gralora.merge_adapters(dst)
    torch.testing.assert_close(run(dst, x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,kw", [("lora", {}), ("gralora", {"k": 2, "hybrid_r": 2})])
def test_hf_gpt2(method, kw):
    """The real thing: transformers' GPT-2, whose c_attn, c_proj and c_fc are Conv1D."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    model = copy.deepcopy(reference)
    names = gralora.add_adapters(model, ["c_attn", "c_proj", "c_fc"], method=method, r=4, **kw)
    assert len(names) == 8 and all(type(model.get_submodule(n).base).__name__ == "Conv1D" for n in names)
    randomize_B(model)
    ids = torch.randint(50, (2, 7))
    logits = model(ids).logits
    expected = with_weights(model, reference, ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(reference(ids).logits, expected)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in gralora.adapter_parameters(model))
    other = copy.deepcopy(reference)
    gralora.add_adapters(other, ["c_attn", "c_proj", "c_fc"], method=method, r=4, **kw)
    gralora.load_adapter_state_dict(other, gralora.adapter_state_dict(model))
    gralora.merge_adapters(other)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, expected, rtol=1e-10, atol=1e-10)
