"""Tests for study/outliers.py: planted outliers, channel RMS, and the update each adapter induces.

    python -m pytest -q study/test_outliers.py

Checked against oracles, in float64 where exactness is claimed:
  * planting an outlier leaves the base model's logits unchanged and multiplies that channel's RMS by s;
  * induced_update equals the first-order change of delta_weight() after one real SGD step on the adapter's
    factors, with gradients from autograd (a central difference, which is exact for dW bilinear in A and B);
  * locality: with X zero except one channel, LoRA's update reaches every column, GraLoRA's stays in that
    channel's input slice (exact zeros elsewhere).
Small, seeded, CPU, a few seconds.
"""

import copy
import dataclasses
import json
import re

import pytest
import torch
import torch.nn as nn

import gralora
from conftest import randomize_B
from study import outliers
from tiny_gpt import train
from tiny_gpt.model import GPT, GPTConfig
from tiny_gpt.train import completion_loss

CONFIG = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIG).double()
    with torch.no_grad():  # a non-trivial LayerNorm, so the test does not rely on gain 1, bias 0
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(seed=0, B=3, T=24):
    return torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- measure and plant


def test_channel_rms_shapes():
    model = tiny_gpt()
    rms = outliers.channel_rms(model, tokens())
    C = CONFIG.n_embd
    expected = {"attn.c_attn": C, "attn.c_proj": C, "mlp.c_fc": C, "mlp.c_proj": 4 * C}
    assert len(rms) == 4 * CONFIG.n_layer
    for name, values in rms.items():
        suffix = next(s for s in expected if name.endswith(s))
        assert values.shape == (expected[suffix],) and (values >= 0).all()
    summary = outliers.rms_summary(rms)
    assert all(s["ratio"] >= 1 and s["max"] == rms[n].max().item() for n, s in summary.items())


def test_channel_rms_sees_through_adapters():
    model = tiny_gpt()
    before = outliers.channel_rms(model, tokens())
    gralora.add_adapters(model, list(outliers.ADAPTED), method="gralora", r=4, k=2)
    after = outliers.channel_rms(model, tokens())
    assert before.keys() == after.keys()
    for name in before:  # B = 0: the adapters change nothing yet
        torch.testing.assert_close(before[name], after[name])


@pytest.mark.parametrize("scale", [0.1, 10.0, 100.0])
@pytest.mark.parametrize("layer", ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"])
def test_plant_preserves_logits_and_grows_rms(layer, scale):
    model, channel = tiny_gpt(), 5
    idx = tokens()
    logits_before, _ = model(idx)
    rms_before = outliers.channel_rms(model, idx)
    outliers.plant_outlier(model, layer, channel, scale)
    logits_after, _ = model(idx)
    rms_after = outliers.channel_rms(model, idx)
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-12, atol=1e-12)
    ratio = rms_after[layer] / rms_before[layer]  # (N,)
    others = torch.ones_like(ratio, dtype=torch.bool)
    others[channel] = False
    torch.testing.assert_close(ratio[channel].item(), scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio[others], torch.ones_like(ratio[others]))
    for name in rms_before:  # no other layer's input changed
        if name != layer:
            torch.testing.assert_close(rms_after[name], rms_before[name])


def test_plant_outliers_everywhere():
    model = tiny_gpt()
    idx = tokens()
    logits_before, _ = model(idx)
    planted = outliers.plant_outliers(model, 50.0, channel=3)
    assert len(planted) == 2 * CONFIG.n_layer
    torch.testing.assert_close(model(idx)[0], logits_before, rtol=1e-12, atol=1e-12)
    summary = outliers.rms_summary(outliers.channel_rms(model, idx))
    assert all(summary[name]["argmax"] == 3 for name in planted)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer="transformer.h.0.attn.c_proj"), "not fed by a LayerNorm"),
    (dict(layer="transformer.h.9.mlp.c_fc"), "no module named"),
    (dict(channel=16), r"channel must be an integer in \[0, 16\).*channel=16"),
    (dict(channel=-1), "channel=-1"),
    (dict(scale=0.0), "scale=0.0"),
    (dict(scale=float("inf")), "scale=inf"),
    (dict(scale=-2), "scale=-2"),
])
def test_plant_argument_errors(kwargs, match):
    args = dict(layer="transformer.h.0.mlp.c_fc", channel=1, scale=10.0) | kwargs
    with pytest.raises(ValueError, match=match):
        outliers.plant_outlier(tiny_gpt(), **args)


def test_plant_refuses_adapted_layer():
    model = tiny_gpt()
    gralora.add_adapters(model, ["mlp.c_fc"], method="lora", r=2)
    with pytest.raises(ValueError, match="already has an adapter"):
        outliers.plant_outlier(model, "transformer.h.0.mlp.c_fc", 1, 10.0)


# ---------------------------------------------------------------- the induced update


def adapter(method, N=12, M=8, r=4, k=2, hybrid_r=0, seed=0, random_B=True):
    torch.manual_seed(seed)
    base = nn.Linear(N, M, dtype=torch.float64)
    layer = (gralora.LoRALinear(base, r) if method == "lora"
             else gralora.GraLoRALinear(base, r, k=k, hybrid_r=hybrid_r))
    return randomize_B(layer, seed) if random_B else layer


@pytest.mark.parametrize("method,k,hybrid_r", [("lora", 1, 0), ("gralora", 2, 0), ("gralora", 4, 0),
                                                ("gralora", 2, 2)])
def test_induced_update_is_the_first_order_sgd_change(method, k, hybrid_r):
    """Oracle: autograd's gradients on A and B, one real SGD step each way, central difference of dW."""
    layer = adapter(method, r=4, k=k, hybrid_r=hybrid_r)
    x = torch.randn(10, 12, dtype=torch.float64)
    layer.base.weight.requires_grad_(True)
    (layer(x) ** 3).sum().backward()  # any loss; G is its gradient with respect to the weight
    G = layer.base.weight.grad
    lr = 1e-3
    predicted = outliers.induced_update(layer, G, lr)  # from the factors before the step
    factors = [p for name, p in layer.named_parameters() if not name.startswith("base")]
    with torch.no_grad():
        for p in factors:
            p -= lr * p.grad
        dW_plus = layer.delta_weight().clone()
        for p in factors:
            p += 2 * lr * p.grad
        dW_minus = layer.delta_weight().clone()
    first_order = (dW_plus - dW_minus) / 2  # exact: the lr^2 terms cancel
    torch.testing.assert_close(predicted, first_order, rtol=1e-10, atol=1e-12)


def test_induced_update_at_k1_is_lora():
    lora = adapter("lora", seed=3)
    gra = gralora.GraLoRALinear(copy.deepcopy(lora.base), 4, k=1)
    with torch.no_grad():
        gra.A.copy_(lora.A[None, None])
        gra.B.copy_(lora.B[None, None])
    G = torch.randn(8, 12, dtype=torch.float64)
    torch.testing.assert_close(outliers.induced_update(gra, G), outliers.induced_update(lora, G))


def test_locality_of_an_outlier_channel():
    """X zero except channel c: FFT's gradient is column c only. With B = 0 (the init), LoRA's induced update
    has non-zero entries in every column; GraLoRA's is exactly zero outside c's input slice."""
    N, M, r, k, c = 12, 8, 4, 2, 7  # slice of channel 7 (n = 6): columns 6..11
    X = torch.zeros(20, N, dtype=torch.float64)
    X[:, c] = 100.0 * torch.randn(20, dtype=torch.float64)
    dY = torch.randn(20, M, dtype=torch.float64)
    G = dY.t() @ X  # (M, N): dL/dW = dY^T X
    assert (G[:, [i for i in range(N) if i != c]] == 0).all()

    lora = outliers.induced_update(adapter("lora", random_B=False), G)
    assert (lora.abs() > 0).all()  # every entry, every column

    gra = outliers.induced_update(adapter("gralora", k=k, random_B=False), G)
    n = N // k
    inside = slice((c // n) * n, (c // n + 1) * n)
    assert (gra[:, :inside.start] == 0).all() and (gra[:, inside.stop:] == 0).all()  # exact zeros
    assert (gra[:, inside].abs() > 0).all()

    leak_lora = outliers.outlier_leak(adapter("lora", random_B=False), G, c)
    leak_gra = outliers.outlier_leak(adapter("gralora", k=k, random_B=False), G, c)
    assert leak_lora["columns_touched"] == 1.0
    assert leak_gra["columns_touched"] == pytest.approx((n - 1) / (N - 1))
    assert leak_gra["columns_swamped"] == pytest.approx((n - 1) / (N - 1))  # nothing else to swamp there


def test_deviation_basics():
    G = torch.randn(6, 5, dtype=torch.float64)
    assert outliers.deviation(G, -3 * G) == pytest.approx(0, abs=1e-12)
    assert outliers.deviation(G, G) == pytest.approx(2)
    U = -G.clone()
    U[:, 0] = 0
    assert outliers.deviation(G, U, columns=[1, 2, 3, 4]) == pytest.approx(0, abs=1e-12)


def test_induced_update_argument_error():
    with pytest.raises(ValueError, match="LoRALinear or GraLoRALinear, got Linear"):
        outliers.induced_update(nn.Linear(4, 4), torch.zeros(4, 4))


def test_gradient_deviation_on_a_gpt():
    model = tiny_gpt().float()
    outliers.plant_outliers(model, 30.0, channel=2)
    idx = tokens(B=2, T=16)
    batches = [(idx[:, :-1], idx[:, 1:])] * 2
    rows = outliers.gradient_deviation(model, batches, "gralora", r=4, k=2, channel=2, train_steps=1)
    assert len(rows) == 4 * CONFIG.n_layer
    for row in rows:
        assert 0 <= row["deviation"] <= 2 and 0 <= row["leak_share"] <= 1


def test_gradient_study_averages_planted_and_control_layers():
    model = tiny_gpt().float()
    idx = tokens(B=2, T=16)
    batches = [(idx[:, :-1], idx[:, 1:])] * 2
    rows = outliers.gradient_study(model.state_dict(), CONFIG, batches, ranks=[4], scales=[1.0, 30.0], seeds=[0],
                                   channel=2, train_steps=(0, 1), lr=1e-2, log=lambda s: None)
    assert len(rows) == 2 * 2 * 2 * 2  # scales x adapter states x methods x layer groups
    # the oracle: gradient_deviation on the planted model, averaged by hand over the planted layers
    planted = copy.deepcopy(model)
    outliers.plant_outliers(planted, 30.0, channel=2)
    per_layer = outliers.gradient_deviation(planted, batches, "gralora", r=4, k=2, channel=2, train_steps=1, lr=1e-2)
    chosen = [row for row in per_layer if row["layer"].endswith(("attn.c_attn", "mlp.c_fc"))]
    expected = sum(row["columns_swamped"] for row in chosen) / len(chosen)
    (row,) = [row for row in rows if (row["method"], row["outlier_scale"], row["train_steps"], row["layers"])
              == ("gralora", 30.0, 1, "planted")]
    assert row["columns_swamped"] == pytest.approx(expected, rel=1e-5)
    assert {r["layers"] for r in rows} == {"planted", "control"}


# ---------------------------------------------------------------- the study's plumbing


def test_planted_state_is_a_base_state_with_the_same_function():
    model = tiny_gpt().float()
    base = model.state_dict()
    assert outliers.planted_state(base, CONFIG, 1) is base  # s = 1: nothing to plant
    state = outliers.planted_state(base, CONFIG, 20.0, channel=4)
    planted = GPT(CONFIG)
    planted.load_state_dict(state)
    idx = tokens()
    torch.testing.assert_close(planted(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-5)
    rms = outliers.channel_rms(planted, idx)["transformer.h.1.mlp.c_fc"]
    assert rms.argmax() == 4


def test_completion_loss_se_matches_train():
    model = tiny_gpt().float()
    examples = []
    for i in range(7):  # (x, y) pairs of different lengths, the first 3 targets masked like a prompt
        ids = tokens(seed=i, B=1, T=10 + i)[0]
        y = ids[1:].clone()
        y[:3] = -1
        examples.append((ids[:-1], y))
    loss, se = outliers.completion_loss_se(model, examples, "cpu", batch_size=3)
    assert loss == pytest.approx(completion_loss(model, examples, "cpu"), rel=1e-5)
    assert 0 < se < loss


def test_plan_study_runs_and_priorities():
    runs = outliers.plan_study(["lora", "gralora", "fft", "hybrid"], [4, 16, 64], [1.0, 10.0, 100.0], range(5),
                               width=128)
    expected = {(m, r, s, seed) for m in ("lora", "gralora") for r in (4, 16, 64) for s in (1.0, 10.0, 100.0)
                for seed in range(5)}
    expected |= {("fft", None, s, seed) for s in (1.0, 10.0, 100.0) for seed in range(5)}
    expected |= {("hybrid", r, s, seed) for r in (4, 16) for s in (1.0, 10.0, 100.0) for seed in range(5)}
    assert len(runs) == len(set(runs)) == 135 and set(runs) == expected
    first = runs[:40]  # LoRA vs GraLoRA, smallest and largest rank, no and largest outlier, 5 seeds
    assert {(m, r, s) for m, r, s, _ in first} == {(m, r, s) for m in ("lora", "gralora") for r in (4, 64)
                                                   for s in (1.0, 100.0)}
    assert first[:5] == [("lora", 4, 1.0, seed) for seed in range(5)]  # a configuration's seeds run together
    assert {(m, s) for m, _, s, _ in runs[40:50]} == {("fft", 1.0), ("fft", 100.0)}
    assert {(m, r) for m, r, _, _ in runs[50:70]} == {("lora", 16), ("gralora", 16)}  # middle rank, end scales
    assert {s for _, _, s, _ in runs[70:105]} == {10.0}  # then the middle scale
    assert {m for m, *_ in runs[105:]} == {"hybrid"}


def test_plan_study_checks_before_training():
    with pytest.raises(ValueError, match="not divisible by k=2"):
        outliers.plan_study(["gralora"], [3], [1.0], [0])
    with pytest.raises(ValueError, match="n_embd=5 is not divisible by k=2"):
        outliers.plan_study(["gralora"], [4], [1.0], [0], width=5)


@pytest.mark.parametrize("argv,match", [
    (["--scales", "1", "0"], r"--scales must be positive finite numbers, got \[0.0\]"),
    (["--grad-scales", "inf"], r"--grad-scales must be positive finite numbers, got \[inf\]"),
    (["--lr-adapter=-1e-3"], "--lr-adapter must be a positive finite number, got -0.001"),
    (["--channel", "128"], r"--channel must be in \[0, 128\) for this preset \(n_embd=128\), got 128"),
    (["--ranks", "5"], r"r=5 \(method=gralora, rank=5\) is not divisible by k=2"),
    (["--ranks", "16,64"], "invalid int value: '16,64'"),  # lists are space-separated
    (["--parts", "measure,gradients"], "invalid choice: 'measure,gradients'"),
    (["--parts", "gradients", "--grad-ranks", "5"], r"r=5 \(method=gralora, rank=5\) is not divisible by k=2"),
])
def test_main_refuses_bad_arguments_before_pretraining(argv, match, monkeypatch, capsys):
    monkeypatch.setattr(outliers, "pretrain", lambda *a, **k: pytest.fail("pretrained before checking"))
    with pytest.raises(SystemExit):
        outliers.main(["--parts", "finetune", "--out", "/nonexistent/x.json"] + argv)
    assert re.search(match, capsys.readouterr().err)


# ---------------------------------------------------------------- the fine-tuning study's bookkeeping


def study_row(method, rank, scale, seed, lr, val_loss, pass_at_1):
    return dict(method=method, rank_budget=rank, outlier_scale=scale, seed=seed, lr=lr, val_loss=val_loss,
                pass_at_1=pass_at_1, k=1 if method == "lora" else 2)


def test_paired_differences_pair_by_seed_and_learning_rate():
    rows = [study_row("lora", 16, 10.0, seed, 1e-2, 0.20 + 0.01 * seed, 0.10) for seed in range(3)]
    rows += [study_row("gralora", 16, 10.0, seed, 1e-2, 0.10 + 0.03 * seed, 0.20) for seed in range(3)]
    rows += [study_row("lora", 16, 10.0, 0, 3e-3, 0.5, 0.0)]  # no GraLoRA partner at this lr: no pair
    diffs = outliers.paired_differences(rows)
    assert list(diffs) == [(1e-2, 10.0, 16)]
    d = diffs[(1e-2, 10.0, 16)]  # differences -0.10, -0.08, -0.06: mean -0.08, std 0.02
    assert d["n"] == 3
    assert d["val_loss"] == pytest.approx(-0.08) and d["val_loss_se"] == pytest.approx(0.02 / 3 ** 0.5)
    assert d["pass_at_1"] == pytest.approx(0.10) and d["pass_at_1_se"] == pytest.approx(0.0, abs=1e-12)
    reverse = outliers.paired_differences(rows, method="lora", baseline="gralora")[(1e-2, 10.0, 16)]
    assert reverse["val_loss"] == pytest.approx(0.08) and reverse["val_loss_se"] == d["val_loss_se"]
    assert outliers.paired_differences(rows, method="hybrid", baseline="lora") == {}


def test_finetune_study_records_lr_resumes_and_refuses_to_mix_rates(tmp_path):
    preset = train.PRESETS["smoke"]
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, pretrain_steps=2, finetune_steps=2,
                                                                   n_train=20, n_val=4, n_test=3))
    base_state, _ = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=lambda s: None)
    out = str(tmp_path / "study.json")
    runs = [("lora", 4, 10.0, 0), ("fft", None, 10.0, 0)]
    rows = outliers.finetune_study(base_state, preset, runs, out, log=lambda s: None)
    assert [(row["method"], row["lr"]) for row in rows] == [("lora", preset.train.lr_adapter),
                                                            ("fft", preset.train.lr_fft)]
    logs = []
    assert outliers.finetune_study(base_state, preset, runs, out, log=logs.append) == rows  # nothing left to run
    assert logs[0].startswith("2 of 2 runs already")
    other = dataclasses.replace(preset, train=dataclasses.replace(preset.train, lr_adapter=0.125))
    with pytest.raises(ValueError, match=r"lr=0.125"):
        outliers.finetune_study(base_state, other, runs, out, log=lambda s: None)
    old = tmp_path / "old.json"  # a file whose rows record no lr
    old.write_text(json.dumps([{key: value for key, value in rows[0].items() if key != "lr"}]))
    with pytest.raises(ValueError, match=r"old.json has a lora row that records no lr"):
        outliers.finetune_study(base_state, preset, runs, str(old), log=lambda s: None)


def test_a_diverged_run_is_kept_without_scores_and_named_in_the_table(tmp_path, monkeypatch):
    preset = train.PRESETS["smoke"]
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, n_val=4, n_test=3))
    model = GPT(preset.gpt)

    def fake_finetune(state, method, rank, seed, preset, device, log):  # LoRA's training loss blows up
        diverged = method == "lora"
        return dict(model=model, diverged=diverged, r=rank, k=1 if method == "lora" else 2, hybrid_r=0,
                    lr=preset.train.lr_adapter, trainable_params=10, pass_at_1=None if diverged else 1 / 3,
                    seconds=1.0, curve=[(1, float("nan") if diverged else 0.5, None)])

    monkeypatch.setattr(outliers, "finetune", fake_finetune)
    out, logs = str(tmp_path / "study.json"), []
    runs = [("lora", 4, 1.0, 0), ("gralora", 4, 1.0, 0)]
    lora, gra = rows = outliers.finetune_study(None, preset, runs, out, log=logs.append)
    assert lora["diverged"] is True and lora["final_train_loss"] is None
    assert [lora[key] for key in ("val_loss", "val_loss_se", "pass_at_1", "pass_at_1_se")] == [None] * 4
    assert "diverged" not in gra and gra["val_loss"] > 0 and gra["pass_at_1_se"] == pytest.approx((2 / 27) ** 0.5)
    assert json.load(open(out)) == rows  # plain JSON, no NaN
    assert "training diverged" in logs[1] and "pass@1 33.3 +- 27.2 %" in logs[2]
    table = outliers.finetune_table(rows).splitlines()
    assert [line.split()[0] for line in table[1:-2]] == ["gralora"]
    assert table[-1] == ("training diverged (loss not finite), left out above: "
                         f"lora rank=4 x1 lr={preset.train.lr_adapter:g} seed=0")
    assert outliers.finetune_study(None, preset, runs, out, log=lambda s: None) == rows  # not run again


def test_lr_part_compares_files_without_pretraining(tmp_path, monkeypatch, capsys):

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the lr part must not pretrain")

    monkeypatch.setattr(outliers, "pretrain", no_pretraining)
    for name, lr in (("a.json", 1e-2), ("b.json", 3e-3)):
        rows = [study_row(method, 16, s, seed, lr, 0.1 + 0.01 * seed + (s > 1) * (method == "lora") * lr, 0.03)
                for method in ("lora", "gralora") for s in (1.0, 100.0) for seed in range(2)]
        rows.append(study_row("lora", 16, 1.0, 7, lr, 9.0, 0.0))  # no GraLoRA partner: left out of the table
        (tmp_path / name).write_text(json.dumps(rows))
    outliers.main(["--parts", "lr", "--preset", "smoke", "--out", str(tmp_path / "a.json"),
                   "--compare", str(tmp_path / "b.json")])
    assert (tmp_path / "a_lr.png").stat().st_size > 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 4  # header, then rank 16 x two scales x two rates
    # at s=100 LoRA's val loss is higher by exactly its lr in these rows: the paired difference is -lr
    assert any(line.split()[:3] == ["16", "x100", "0.01"] and "-0.0100+-0.0000" in line for line in lines)
    assert any(line.split()[:3] == ["16", "x100", "0.003"] and "-0.0030+-0.0000" in line for line in lines)
    assert any(line.split()[:5] == ["16", "x1", "0.01", "0.1050+-0.0050", "0.1050+-0.0050"] for line in lines)
    with pytest.raises(SystemExit):
        outliers.main(["--parts", "lr,bogus", "--out", str(tmp_path / "a.json")])
    assert "bogus" in capsys.readouterr().err


def test_load_studies_refuses_missing_lr_and_runs_counted_twice(tmp_path):
    rows = [study_row("lora", 16, 1.0, seed, 1e-2, 0.1, 0.03) for seed in range(2)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps(rows[1:]))
    (tmp_path / "old.json").write_text(json.dumps([{k: v for k, v in rows[0].items() if k != "lr"}]))
    assert outliers.load_studies([str(tmp_path / "a.json")]) == rows
    with pytest.raises(ValueError, match=r"\('lora', 0.01, 1.0, 16, 1\).*a.json.*b.json"):
        outliers.load_studies([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with pytest.raises(ValueError, match=r"old.json: a lora row records no lr"):
        outliers.load_studies([str(tmp_path / "old.json")])
    with pytest.raises(ValueError, match=r"no study file .*missing.json"):
        outliers.load_studies([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])


def test_figures_part_redraws_the_gradient_figure_and_table_without_pretraining(tmp_path, monkeypatch, capsys):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("the figures part must not pretrain")

    monkeypatch.setattr(outliers, "pretrain", no_pretraining)
    rows = [dict(method=method, r=r, k=1 if method == "lora" else 2, seed=seed, outlier_scale=scale, train_steps=steps,
                 layers="planted", deviation=0.5, deviation_others=0.6, leak_share=0.9, columns_touched=1.0,
                 columns_swamped=0.3 + 0.01 * seed)
            for method in ("lora", "gralora") for r in (4, 16) for seed in range(2) for scale in (1.0, 100.0)
            for steps in (0, 10)]
    (tmp_path / "s_gradients.json").write_text(json.dumps(rows))
    outliers.main(["--parts", "figures", "--out", str(tmp_path / "s.json")])
    assert (tmp_path / "s_gradients.png").stat().st_size > 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 2 * 2 * 2 * 2  # header, then steps x scales x ranks x methods
    # swamped share: seeds 0 and 1 give 0.30 and 0.31, so mean 0.305 and std 0.00707
    assert table[1].split() == ["0", "x1", "4", "gralora", "0.500+-0.000", "0.600+-0.000", "0.305+-0.007"]
