"""Scale tests: gralora.py's layers under torch.compile and under DistributedDataParallel.

    python -m pytest -q test_scale.py        # about 10 to 30 s on 2 CPU cores (less with a warm compile cache)

1. torch.compile (TorchInductor) on LoRALinear, GraLoRALinear and Hybrid GraLoRA: the compiled
   model's output and gradients equal eager mode's (float32, tight tolerance). Skipped, with the
   reason, where this platform cannot compile (torch.compile unsupported, or no C++ compiler).
2. DistributedDataParallel: 2 CPU processes (gloo backend on the loopback interface, meeting through a
   rendezvous file, so no port is chosen and then raced for) each take half of every batch of a
   GraLoRA-wrapped model. After backward, the adapter gradients
   (averaged across the processes by DDP) equal one process's gradients on the full batch, in
   float64; only adapter factors get gradients; and a few SGD steps land on the same factors.
   Each worker waits at a barrier, frees DDP and destroys its process group before it returns, while its
   interpreter is fully alive (see _ddp_worker).
"""

import datetime
import gc
import os
import pathlib
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import gralora
from conftest import randomize_B


# ---------------------------------------------------------------- torch.compile


def _cannot_compile():
    """Why torch.compile cannot run on this platform, or None if it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on {sys.platform} with Python {sys.version.split()[0]}"
    try:
        torch._inductor.cpp_builder.get_cpp_compiler()  # TorchInductor's CPU code is C++
    except Exception as e:  # noqa: BLE001 (whatever the reason, it is the platform's)
        return f"TorchInductor finds no C++ compiler: {e}"
    return None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compile_matches_eager():
    reason = _cannot_compile()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = nn.Sequential(  # one compiled graph for all three layer kinds keeps the test fast
        gralora.LoRALinear(nn.Linear(16, 24), r=8),
        gralora.GraLoRALinear(nn.Linear(24, 24), r=8, k=2),
        gralora.GraLoRALinear(nn.Linear(24, 16), r=8, k=4, hybrid_r=4),
    )
    randomize_B(model, seed=1)
    x = torch.randn(3, 5, 16)
    grad_out = torch.randn(3, 5, 16)

    def run(fn):
        xg = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        y = fn(xg)
        y.backward(grad_out)
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return y.detach(), xg.grad, grads

    y_eager, dx_eager, grads_eager = run(model)
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool: faster on a small machine
        y_comp, dx_comp, grads_comp = run(torch.compile(model))
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_comp, dx_eager, rtol=1e-5, atol=1e-5)
    assert grads_comp.keys() == grads_eager.keys() and len(grads_eager) == 2 + 2 + 4
    for name in grads_eager:
        torch.testing.assert_close(grads_comp[name], grads_eager[name], rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- DistributedDataParallel

STEPS, LR = 3, 0.1


class _MLP(nn.Module):
    """A small MLP block with GPT-2 names."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def _model():
    """The MLP in float64 with GraLoRA on both Linears (Hybrid on c_proj), the same in every process."""
    torch.manual_seed(0)
    model = _MLP().double()
    gralora.add_adapters(model, ["c_fc"], method="gralora", r=8, k=2)
    gralora.add_adapters(model, ["c_proj"], method="hybrid", r=8, k=4, hybrid_r=4)
    randomize_B(model, seed=1)
    return model


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 5, 16, generator=gen, dtype=torch.float64),
             torch.randn(8, 5, 16, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def _loss(out, target):
    return (out - target).pow(2).mean()  # a mean: DDP's gradient average over equal halves is exact


def _train(model, forward, batches, rank=0, world=1):
    """SGD on this rank's share of every batch, calling `forward` (the model or its DDP wrapper).
    Returns the first step's gradients by name, the names that got one, and the final factors."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    first = None
    for x, target in batches:
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad(set_to_none=True)
        _loss(forward(x[share]), target[share]).backward()
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return first, sorted(first), gralora.adapter_state_dict(model)


def _ddp_worker(rank, world, out_dir):
    """One DDP process, torn down in a fixed order before it returns: a barrier (no rank tears down while
    the other still talks to it), then DDP freed (it sits in a reference cycle and holds the process group,
    so gc.collect() releases it here rather than the garbage collector at interpreter exit), then the
    group destroyed, gloo's threads and connections and, on rank 0, the rendezvous store's server with it."""
    torch.set_num_threads(1)
    store = pathlib.Path(out_dir, "rendezvous").as_uri()  # a file: no free port to pick, nothing to race for
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    ddp = None
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        result = _train(model, ddp, _batches(), rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        del ddp
        gc.collect()  # frees the DDP cycle, and with it DDP's reference to the process group
        dist.destroy_process_group()


def _loopback_interface():
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    lo = _loopback_interface()
    if lo:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", lo)  # gloo stays on 127.0.0.1, whatever the hostname says
    world = 2
    ctx = mp.spawn(_ddp_worker, args=(world, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):  # False until every worker is done
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 60 s")

    single = _model()
    grads, names, factors = _train(single, single, _batches())
    adapter_names = sorted(n for n, _ in gralora.adapter_parameters(single))
    assert names == adapter_names  # only adapter factors get gradients
    for rank in range(world):
        r_grads, r_names, r_factors = torch.load(tmp_path / f"rank{rank}.pt")
        assert r_names == adapter_names, f"rank {rank}: gradients on {r_names}"
        for n in adapter_names:
            torch.testing.assert_close(r_grads[n], grads[n], rtol=1e-12, atol=1e-14,
                                       msg=f"rank {rank} gradient of {n}")
        for n in factors:
            torch.testing.assert_close(r_factors[n], factors[n], rtol=1e-12, atol=1e-14,
                                       msg=f"rank {rank} factor {n} after {STEPS} steps")
