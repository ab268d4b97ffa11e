"""Tests for tiny_gpt/: the model, the toy data, training, the CLI and the report (passes(): test_evaluate.py).

Run from the repository root:

    python -m pytest -q test_tiny_gpt.py

Everything is small, seeded and on the CPU. What is checked:
  * model: shapes; causality (a future token never changes an earlier logit); batched, left-padded, cached
    greedy decoding equals decoding each prompt alone by full recomputation (the oracle);
  * data: the tokenizer round-trips and names an unknown character; the same seed gives the same data; the
    held-out tasks are compositions absent from training; every reference solution passes its own test;
  * training: a short fine-tune lowers the loss; LoRA, GraLoRA and Hybrid train equally many parameters at
    the same rank budget; bad arguments raise ValueError naming them; a repeated rank or seed runs once; the
    pretraining cache is reused, and a corrupt or mismatched cache file is rebuilt;
  * the CLI: `python -m tiny_gpt --preset smoke --out FILE` end to end, stopped by Ctrl-C and continued; a
    diverging run said so; usage errors (device, rank, --out, --fig, the cache folder) before any work; other
    settings in FILE refused; every row done: only the table and figure; the rows kept when FILE fails;
    files written atomically with the usual permissions; progress through a pipe; each preset's code path;
  * the report: the table (mean ± std, diverged seeds) and the sweep figure (colours, readable axes, legend).
"""

import dataclasses
import itertools
import json
import math
import os
import pathlib
import signal
import stat
import subprocess
import sys

import pytest
import torch

import gralora
import tiny_gpt.__main__ as cli
from tiny_gpt import data, report, train
from tiny_gpt.__main__ import main
from tiny_gpt.data import CharTokenizer, make_corpus, make_tasks
from tiny_gpt.evaluate import complete, passes
from tiny_gpt.model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, std=None):
    """A small random GPT; a large `std` makes its greedy outputs varied instead of constant."""
    torch.manual_seed(seed)
    model = GPT(TINY).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    return model


# ---------------------------------------------------------------------------------------------------------
# model


def test_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    targets = idx.clone()
    targets[:, :4] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, TINY.vocab_size)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("t", [1, 5, 11])
def test_causality(t):
    model = tiny_model(std=0.3)
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)  # earlier positions: untouched
    assert not torch.allclose(before[:, t], after[:, t])  # the changed position itself does change


def naive_greedy(model, ids, n):
    """The oracle: re-run the whole sequence for every new token, no cache, no padding."""
    idx = torch.tensor([ids])
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[0][:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx[0, len(ids):].tolist()


def test_batched_cached_generation_matches_naive_decoding():
    model = tiny_model(std=0.3)
    prompts = [[int(x) for x in torch.randint(0, 96, (length,))] for length in (3, 9, 5, 9, 1)]
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[7] * (T - len(p)) + p for p in prompts])  # left-padded with an arbitrary id
    out = model.generate(idx, 12, lengths=torch.tensor([len(p) for p in prompts]))
    for row, prompt in zip(out[:, T:].tolist(), prompts):
        assert row == naive_greedy(model, prompt, 12)
    with pytest.raises(ValueError, match="a prompt of 64 tokens leaves no room to generate within block_size=64"):
        model.generate(torch.zeros(1, 64, dtype=torch.long), 5)


def test_generate_stops_at_the_stop_sequence_and_complete_cuts_there():
    tokenizer = CharTokenizer()
    model = tiny_model(std=0.3)
    out = model.generate(torch.tensor([[1, 2, 3]]), 40)
    first_new = out[0, 3:5].tolist()
    stopped = model.generate(torch.tensor([[1, 2, 3]]), 40, stop=first_new)
    assert stopped.shape == (1, 5)  # ended as soon as the stop sequence appeared
    # complete() keeps a completion up to and including its first stop sequence, and nothing after it
    class Scripted(torch.nn.Module):  # "generates" a fixed text, whatever the prompt
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, idx, max_new_tokens, stop=None, lengths=None):
            tail = torch.tensor(tokenizer.encode("x = 1" + data.STOP + "junk"))
            return torch.cat([idx, tail.expand(idx.size(0), -1)], dim=1)

    assert complete(Scripted(), tokenizer, ["ab", "abcd"]) == ["x = 1" + data.STOP] * 2


# ---------------------------------------------------------------------------------------------------------
# data


def test_tokenizer_round_trip_and_unknown_character():
    tokenizer = CharTokenizer()
    tasks = make_tasks(0, n_train=50, n_val=10, n_test=10)
    text = make_corpus(0, 50) + "".join(t.prompt + t.completion + t.test for t in tasks.train)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < tokenizer.vocab_size == TINY.vocab_size
    with pytest.raises(ValueError, match="'é' at position 3"):
        tokenizer.encode("abcé")


def test_data_is_deterministic():
    assert make_tasks(3, n_train=100, n_val=20, n_test=20) == make_tasks(3, n_train=100, n_val=20, n_test=20)
    assert make_corpus(3, 100) == make_corpus(3, 100)
    sizes = dict(n_train=100, n_val=20, n_test=20)
    assert make_tasks(4, **sizes).train != make_tasks(3, **sizes).train
    assert make_corpus(4, 100) != make_corpus(3, 100)


def test_held_out_tasks_are_new_compositions():
    tasks = make_tasks(0)
    train_pairs = {t.ops for t in tasks.train}
    val_pairs, test_pairs = {t.ops for t in tasks.val}, {t.ops for t in tasks.test}
    assert not train_pairs & test_pairs and not train_pairs & val_pairs and not val_pairs & test_pairs
    train_prompts = {t.prompt for t in tasks.train}
    assert not train_prompts & {t.prompt for t in tasks.test + tasks.val}
    for position in (0, 1):  # yet every primitive of a test task was seen in training, in that position
        assert {t.ops[position] for t in tasks.test} <= {t.ops[position] for t in tasks.train}
    assert len(tasks.test) >= 200 and len({t.prompt for t in tasks.test}) == len(tasks.test)


def test_reference_solutions_pass_and_the_corpus_runs(capsys):
    tasks = make_tasks(0, n_train=10, n_val=5, n_test=5)
    for task in tasks.train[:5] + tasks.test[:3]:
        assert passes(task.prompt + task.completion, task.test)
        assert not passes(task.prompt + "    return None\n\n", task.test)
    exec(make_corpus(0, 300), {})  # every pretraining program is runnable Python
    assert capsys.readouterr().out  # ... and they print their results


# ---------------------------------------------------------------------------------------------------------
# training


def smoke_preset(**train_changes):
    preset = train.PRESETS["smoke"]
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **train_changes))


def quick(preset, **train_changes):
    """`preset` cut down to a check of its code path in seconds: its model shapes and learning rates, 2 + 2
    steps on batches of 2, 4 val and 2 test tasks. Its numbers mean nothing."""
    return dataclasses.replace(preset, train=dataclasses.replace(
        preset.train, corpus_programs=200, pretrain_steps=2, pretrain_batch=2, n_train=32, n_val=4, n_test=2,
        finetune_steps=2, finetune_batch=2, eval_every=1, **train_changes))


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    """A cache folder holding the smoke preset's base model, pretrained once for the tests that need it."""
    folder = tmp_path_factory.mktemp("cache")
    train.pretrain(train.PRESETS["smoke"].gpt, train.PRESETS["smoke"].train, "cpu", str(folder), log=lambda s: None)
    return folder


def test_short_finetune_lowers_the_loss(tmp_path):
    preset = smoke_preset(pretrain_steps=20, finetune_steps=20, eval_every=10)
    base_state, _ = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=lambda s: None)
    base = train.finetune(base_state, "base", preset=preset, log=lambda s: None)
    for method in ("lora", "gralora"):
        row = train.finetune(base_state, method, rank=4, preset=preset, log=lambda s: None)
        assert row["val_loss"] < base["val_loss"] - 0.01, method  # seeded: the same margin every run
        assert [step for step, _, _ in row["curve"]] == [10, 20]
        assert row["lr"] == preset.train.lr_adapter and row["diverged"] is False
    assert base["lr"] is None
    with pytest.raises(ValueError, match="'sgd'"):
        preset.train.lr_for("sgd")


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_equal_trainable_params_at_equal_rank(rank):
    counts = {}
    for method in ("lora", "gralora", "hybrid"):
        model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))
        r, k, hybrid_r = train.adapter_spec(method, rank)
        gralora.add_adapters(model, train.TARGETS, method=method, r=r, k=k, hybrid_r=hybrid_r)
        counts[method] = gralora.count_trainable_params(model)
    assert counts["lora"] == counts["gralora"] == counts["hybrid"] == rank * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)


def test_adapter_spec_follows_the_paper_and_rejects_bad_values():
    assert train.adapter_spec("lora", 16) == (16, 1, 0)
    assert train.adapter_spec("gralora", 16) == (16, 2, 0)
    assert train.adapter_spec("gralora", 64) == (64, 4, 0)
    assert train.adapter_spec("hybrid", 16) == (8, 2, 8)
    assert train.adapter_spec("lora", 128, width=128) == (128, 1, 0)  # as wide as the model: allowed
    with pytest.raises(ValueError, match="rank=0"):
        train.adapter_spec("lora", 0)
    with pytest.raises(ValueError, match=r"r=6 .* is not divisible by k=4$"):
        train.adapter_spec("gralora", 6, k=4)
    for k in (0, -2):  # -2 divides 6: the message must not blame divisibility
        with pytest.raises(ValueError, match=rf"r=6 .* needs a positive integer k, got k={k}$"):
            train.adapter_spec("gralora", 6, k=k)
    for rank, hybrid_r, k in ((16, 0, None), (16, 16, None), (16, -4, None), (1, None, 1)):  # rank 1: 1 // 2 = 0
        with pytest.raises(ValueError, match=rf"hybrid needs 0 < hybrid_r < rank .*, got hybrid_r={hybrid_r or 0}$"):
            train.adapter_spec("hybrid", rank, k=k, hybrid_r=hybrid_r)
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by k=4"):
        train.adapter_spec("gralora", 8, k=4, width=30)
    with pytest.raises(ValueError, match="rank=256 exceeds the model width n_embd=128"):
        train.adapter_spec("hybrid", 256, width=128)
    with pytest.raises(ValueError, match="method='dora'"):
        train.adapter_spec("dora", 8)
    with pytest.raises(ValueError, match="unknown preset 'laptop'"):
        train.get_preset("laptop")
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        train.finetune({}, "dora", preset="smoke")


def test_plan_runs_counts_a_repeated_value_once():
    once = train.plan_runs(["base", "fft", "lora", "hybrid"], [4, 16], [0, 1], ks=[2])
    assert train.plan_runs(["base", "fft", "lora", "lora", "hybrid"], [4, 16, 4], [0, 1, 0, 1], ks=[2, 2]) == once
    assert len(once) == 1 + 2 * (1 + 2 + 2)  # base; per seed: fft, lora at 2 ranks, hybrid at 2 ranks
    assert ("hybrid", 64, None, None, 0) not in train.plan_runs(["hybrid"], [16, 64], [0])  # paper: r <= 16


def test_pretrain_cache_is_reused_and_rebuilt(tmp_path):
    preset = smoke_preset(pretrain_steps=2)
    messages = []
    first, cached = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=messages.append)
    assert not cached
    second, cached = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=messages.append)
    assert cached and all(torch.equal(first[k], second[k]) for k in first)

    path = train.cache_path(preset.gpt, preset.train, str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    _, cached = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=messages.append)
    unreadable = [m for m in messages if "unreadable" in m]
    assert not cached and len(unreadable) == 1
    # one short line, without torch's paragraph of advice about weights_only
    assert "\n" not in unreadable[0] and "weights_only" not in unreadable[0] and len(unreadable[0]) < 200

    saved = torch.load(path, weights_only=True)
    saved["config"]["pretrain_steps"] = 999  # a file whose stored config differs from the one asked for
    torch.save(saved, path)
    _, cached = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=messages.append)
    assert not cached and any("another config" in m for m in messages)

    # every field pretraining reads is in the key: a change gives a new file, never stale weights
    for field, value in dict(pretrain_steps=3, pretrain_lr=1e-4, pretrain_batch=3, pretrain_seed=7,
                             pretrain_weight_decay=0.0, corpus_programs=77, data_seed=5, warmup_frac=0.3,
                             min_lr_frac=0.5, grad_clip=0.1, bf16=True).items():
        other = smoke_preset(**{"pretrain_steps": 2, field: value})
        assert train.cache_path(other.gpt, other.train, str(tmp_path)) != path, field
    # ... and fine-tuning fields are not: they never make pretraining run again
    same = smoke_preset(pretrain_steps=2, finetune_steps=99, lr_adapter=0.5, n_test=7)
    assert train.cache_path(same.gpt, same.train, str(tmp_path)) == path


def test_pretrain_cache_key_says_whether_bf16_was_used(tmp_path):
    """bf16=None means autocast on CUDA only, so on "cuda" it is the cache of bf16=True that is read (found in the
    cache, so no GPU is needed here), and on the cpu that of bf16=False."""
    for device, used in (("cuda", True), ("cpu", False)):
        cfg = smoke_preset(bf16=used).train
        path = train.cache_path(train.PRESETS["smoke"].gpt, cfg, str(tmp_path))
        state = {"marker": torch.tensor([float(used)])}
        torch.save(dict(config=train._pretrain_config(train.PRESETS["smoke"].gpt, cfg), state_dict=state), path)
        loaded, cached = train.pretrain(train.PRESETS["smoke"].gpt, smoke_preset(bf16=None).train, device,
                                        str(tmp_path), log=lambda s: None)
        assert cached and torch.equal(loaded["marker"], state["marker"]), device


# ---------------------------------------------------------------------------------------------------------
# the CLI


def run_main(argv, capsys):
    """`python -m tiny_gpt argv` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def fake_training(monkeypatch, on_finetune=lambda n: None):
    """Replace pretraining and fine-tuning in the CLI by instant fakes that return well-formed rows. Returns
    the list of calls: ("pretrain",) and (method, rank, seed) for each fine-tuning."""
    calls = []

    def finetune(base_state, method, rank=None, k=None, hybrid_r=None, seed=0, preset=None, device=None):
        calls.append((method, rank, seed))
        on_finetune(len(calls) - 1)  # the number of this fine-tuning (calls[0] is the pretraining)
        r, k, hybrid_r = train.adapter_spec(method, rank, k, hybrid_r) if rank else (None, None, None)
        return dict(method=method, r=r, k=k, hybrid_r=hybrid_r, seed=None if method == "base" else seed,
                    trainable_params=10, val_loss=1.0 / len(calls), pass_at_1=0.5, seconds=0.1, lr=1e-2,
                    rank_budget=rank, adapter_flops_per_token=0, diverged=False, curve=[], model=None)

    monkeypatch.setattr(cli, "pretrain", lambda *args, **kwargs: calls.append(("pretrain",)) or ({}, True))
    monkeypatch.setattr(cli, "finetune", finetune)
    return calls


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_cli_smoke_end_to_end_interrupted_and_continued(tmp_path, smoke_cache, monkeypatch, capsys):
    """`python -m tiny_gpt --preset smoke --out FILE`, stopped by Ctrl-C (a real SIGINT, sent as the third run
    starts, so the test does not race the job): one line on stderr says what was saved, where and how to go on,
    exit status 130. The same command, as a new process, then runs only the three runs left, and FILE holds
    every method once, in the CLI's row format, with the settings."""
    out = tmp_path / "rows.json"
    command = [sys.executable, "-m", "tiny_gpt", "--preset", "smoke", "--out", str(out)]
    monkeypatch.setenv("TINY_GPT_CACHE", str(smoke_cache))
    env, real_finetune, started = dict(os.environ), cli.finetune, []

    def finetune(*args, **kwargs):
        started.append(args[1])
        if len(started) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at its next bytecode
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(cli, "finetune", finetune)
    # Ctrl-C as in a terminal, also where the tests run as a background job (which starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status, _, stderr = run_main(command[3:], capsys)
    finally:
        signal.signal(signal.SIGINT, before)
    assert status == 130, stderr
    assert stderr.strip() == (f"tiny_gpt: interrupted; the 2 finished runs are in {out}; the same command "
                              "continues from there")
    first = json.loads(out.read_text())["rows"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5 runs, 2 of them already in" in result.stdout and "fft rank" not in result.stdout
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert rows[:2] == first and [row["method"] for row in rows] == ["base", "fft", "lora", "gralora", "hybrid"]
    assert doc["config"] == {**dataclasses.asdict(train.PRESETS["smoke"].gpt),
                             **dataclasses.asdict(train.PRESETS["smoke"].train), "bf16": False}
    types = dict(method=str, r=(int, type(None)), k=(int, type(None)), hybrid_r=(int, type(None)),
                 seed=(int, type(None)), trainable_params=int, val_loss=float, pass_at_1=(int, float),
                 seconds=(int, float), diverged=bool)
    for row in rows:
        for key, kind in types.items():
            assert isinstance(row[key], kind), (key, row)
        assert 0.0 <= row["pass_at_1"] <= 1.0
    adapters = [row for row in rows if row["r"] is not None]
    assert len({row["trainable_params"] for row in adapters}) == 1  # parameter parity
    assert "pass@1" in result.stdout and "adapter FLOPs/tok" in result.stdout


def test_cli_says_when_a_run_diverges(tmp_path, smoke_cache, monkeypatch, capsys):
    """A learning rate of 1e9 makes the loss non-finite: the run stops, its row says diverged (no val loss, no
    pass@1), and so do its progress line and the table."""
    monkeypatch.setenv("TINY_GPT_CACHE", str(smoke_cache))
    out = tmp_path / "rows.json"
    status, stdout, _ = run_main(["--preset", "smoke", "--methods", "lora", "--lr-adapter", "1e9", "--out", str(out)],
                                 capsys)
    assert status == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["diverged"] is True and row["val_loss"] is None and row["pass_at_1"] is None
    assert "lora rank=4 seed=0: diverged" in stdout
    table_row = stdout.strip().splitlines()[-1]  # val loss, pass@1 and the seeds column say it
    assert table_row.split()[0] == "lora" and table_row.count("diverged") == 3, table_row


def test_cli_continues_where_it_stopped_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    out, fig = tmp_path / "rows.json", tmp_path / "rows.png"
    argv = ["--preset", "smoke", "--methods", "fft", "lora", "--ranks", "4", "8", "--seeds", "0", "1",
            "--out", str(out)]

    def interrupt(n):
        if n == 3:
            raise KeyboardInterrupt

    fake_training(monkeypatch, interrupt)
    status, _, stderr = run_main(argv, capsys)
    assert status == 130
    assert stderr.strip() == (f"tiny_gpt: interrupted; the 2 finished runs are in {out}; the same command "
                              "continues from there")
    first = json.loads(out.read_text())["rows"]
    assert [(row["method"], row["seed"]) for row in first] == [("fft", 0), ("lora", 0)]

    calls = fake_training(monkeypatch)
    status, stdout, _ = run_main(argv, capsys)
    assert status == 0 and "6 runs, 2 of them already in" in stdout
    assert calls == [("pretrain",), ("lora", 8, 0), ("fft", None, 1), ("lora", 4, 1), ("lora", 8, 1)]
    assert json.loads(out.read_text())["rows"][:2] == first and fig.exists()  # a sweep: the figure beside --out

    fig.unlink()  # every run done: the table and the figure again, nothing trained
    calls = fake_training(monkeypatch)
    status, stdout, _ = run_main(argv, capsys)
    assert status == 0 and calls == [] and "6 runs, 6 of them already in" in stdout and fig.exists()
    table = [line.split()[:2] for line in stdout.splitlines() if line.split()[:1] in (["fft"], ["lora"])]
    assert table == [["fft", "-"], ["lora", "4"], ["lora", "8"]]  # each with its 2 seeds

    for extra, why in ((["--lr-adapter", "3e-3"], "lr_adapter=0.01 there, 0.003 here"),
                       (["--preset", "cpu"], "n_embd=32 there, 128 here")):
        status, _, stderr = run_main(argv + extra, capsys)
        assert status == 2 and why in stderr and len(stderr.strip().splitlines()) == 1, stderr
    settings = json.loads(out.read_text())["config"]
    for doc in (first, dict(config=[], rows=[]), dict(config=settings, rows=[dict(method="lora")])):
        out.write_text(json.dumps(doc))  # rows without settings, settings not a dict, a row without its key
        status, _, stderr = run_main(argv, capsys)
        assert status == 2 and "is not a results file" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert calls == []

    fake_training(monkeypatch, lambda n: n == 1 and interrupt(3))  # interrupted before any run finished
    status, _, stderr = run_main(argv[:-1] + [str(tmp_path / "new.json")], capsys)
    assert status == 130 and stderr.strip().splitlines() == [
        f"tiny_gpt: interrupted; no run had finished, so {tmp_path / 'new.json'} was not written"]
    assert not (tmp_path / "new.json").exists()

    fake_training(monkeypatch, interrupt)  # interrupted without --out: nothing kept, and it says how to keep it
    status, _, stderr = run_main(argv[:-2], capsys)
    assert status == 130 and stderr.strip().splitlines() == [
        "tiny_gpt: interrupted; nothing was saved (no --out); with --out FILE the finished runs are kept"]


def test_cli_redraws_the_readme_figure_from_the_committed_sweep(tmp_path, monkeypatch, capsys):
    """The README's sweep command, every run already in results/sweep_cpu.json: the table and the figure, no
    training (the committed file was made with the cpu preset's settings)."""
    calls = fake_training(monkeypatch)
    out = tmp_path / "sweep_cpu.json"
    out.write_text((pathlib.Path(ROOT) / "results" / "sweep_cpu.json").read_text())
    status, stdout, _ = run_main(["--preset", "cpu", "--ranks", "4", "16", "64", "--seeds", "0", "1", "2",
                                  "--out", str(out), "--fig", str(tmp_path / "fig.png")], capsys)
    assert status == 0 and calls == [] and "28 runs, 28 of them already in" in stdout
    assert "0.0957 ± 0.0047" in stdout and (tmp_path / "fig.png").stat().st_size > 10_000


def test_cli_refuses_impossible_runs_before_training(monkeypatch, capsys):
    """A usage error (exit 2, one line naming the value), before any pretraining."""
    calls = fake_training(monkeypatch)
    for args, why in ((["--ranks", "6", "--k", "4"], "not divisible by k=4"),
                      (["--k", "-2"], "needs a positive integer k, got k=-2"),
                      (["--methods", "hybrid", "--hybrid-r", "0"], "hybrid needs 0 < hybrid_r < rank"),
                      (["--methods", "hybrid", "--ranks", "32"], "no run to do: hybrid runs only at ranks up to 16"),
                      (["--preset", "cpu", "--ranks", "256"], "rank=256 exceeds the model width n_embd=128"),
                      (["--lr-adapter", "0"], "got 0.0"), (["--lr-adapter", "-2"], "got -2.0"),
                      (["--lr-adapter", "nan"], "got nan")):
        status, out, err = run_main(["--preset", "smoke"] + args, capsys)
        assert status == 2 and why in err and len(err.strip().splitlines()) == 1, (args, err)
    assert calls == []


def test_cli_counts_a_repeated_value_once(monkeypatch, capsys):
    calls = fake_training(monkeypatch)
    status, stdout, _ = run_main(["--preset", "smoke", "--methods", "lora", "lora", "--ranks", "4", "4",
                                  "--seeds", "0", "0"], capsys)
    assert status == 0 and calls == [("pretrain",), ("lora", 4, 0)]
    assert "± " not in stdout  # one seed: no spread to show
    assert "1 run (repeated values count once: --ranks 4 4; --seeds 0 0)" in stdout  # and it says so


def test_cli_refuses_unwritable_paths_before_any_work(tmp_path, monkeypatch, capsys):
    """A bad --out, --fig or cache folder ($TINY_GPT_CACHE) is a one-line usage error (exit 2) naming the path
    and why, before any pretraining."""
    calls = fake_training(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(["--out", str(a_file / "rows.json")], None, f"{a_file} is not a folder"),
             (["--out", str(tmp_path)], None, "is a folder, not a file"),
             (["--fig", str(a_file / "sub" / "fig.png")], None, f"cannot create the folder {a_file / 'sub'}"),
             (["--fig", str(tmp_path / "fig.xyz")], None, "cannot write 'xyz' files"),
             ([], str(a_file), f"cache ($TINY_GPT_CACHE): {a_file} is not a folder")]
    if sys.platform.startswith("linux"):  # a folder that cannot be created
        cases += [(["--out", "/proc/nope/x.json"], None, "cannot create the folder /proc/nope"),
                  ([], "/proc/nope", "cannot create the folder /proc/nope")]
    for args, cache, why in cases:
        monkeypatch.setenv("TINY_GPT_CACHE", cache or str(tmp_path / "cache"))
        status, out, err = run_main(["--preset", "smoke"] + args, capsys)
        assert status == 2, args
        assert len(err.strip().splitlines()) == 1 and why in err, err
        assert out == "" and calls == [] and not (tmp_path / "cache").exists()  # nothing ran


def test_cli_refuses_unavailable_devices(capsys):
    bad = ["foo", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"])
    for name in bad:
        status, out, err = run_main(["--preset", "smoke", "--device", name], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert f"device '{name}' is not available here; available: cpu" in err
    assert train.parse_device("cpu") == torch.device("cpu")


def test_cli_creates_a_missing_output_folder(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch)
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "new" / "deeper" / "rows.json"
    status, _, _ = run_main(["--preset", "smoke", "--methods", "lora", "gralora", "--out", str(out)], capsys)
    assert status == 0
    assert [row["method"] for row in json.loads(out.read_text())["rows"]] == ["lora", "gralora"]
    assert os.listdir(out.parent) == ["rows.json"]  # no temporary file left behind


def test_cli_keeps_the_rows_when_out_fails_mid_run(tmp_path, monkeypatch, capsys):
    """The --out folder turns into a file after the first run: the job stops with status 1, stderr says why,
    and the finished rows are printed as JSON instead of being lost."""
    folder = tmp_path / "results"

    def sabotage(n):
        if n == 2:  # after the first row was written: the folder becomes a file
            for name in os.listdir(folder):
                os.remove(folder / name)
            folder.rmdir()
            folder.write_text("")

    calls = fake_training(monkeypatch, sabotage)
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    status, stdout, stderr = run_main(["--preset", "smoke", "--methods", "base", "lora", "gralora",
                                       "--out", str(folder / "rows.json")], capsys)
    assert status == 1 and f"cannot write --out {folder / 'rows.json'}" in stderr
    assert [row["method"] for row in json.loads(stdout.splitlines()[-1])["rows"]] == ["base", "lora"]
    assert calls[-1][0] == "lora"  # stopped there


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "rows.json"
    train.write_json(str(path), [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    with pytest.raises(TypeError):  # cannot be serialised: the old file stays whole
        train.write_json(str(path), [3, object()])
    with pytest.raises(ZeroDivisionError):  # fails half-way through writing: the same
        train.write_atomic(str(path), lambda f: f.write(b"[3,") and 1 / 0)
    assert json.loads(path.read_text()) == [1, 2] and os.listdir(tmp_path) == ["rows.json"]
    with pytest.raises(OSError):
        train.write_json(str(tmp_path / "missing" / "rows.json"), [])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    """As `open` would make them: 0666 less the umask (readable by the class on a shared machine)."""
    old = os.umask(umask)
    try:
        train.write_json(str(tmp_path / "rows.json"), [])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rows.json").stat().st_mode) == 0o666 & ~umask


def test_progress_lines_flow_through_a_pipe(tmp_path):
    """`python -m tiny_gpt | tee log` shows progress as it happens, not at exit: the first progress line is
    readable from the pipe while the job is still at work (the final table not yet written)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as a user has it
    env["TINY_GPT_CACHE"] = str(tmp_path / "cache")  # an empty cache: pretraining logs first
    proc = subprocess.Popen([sys.executable, "-m", "tiny_gpt", "--preset", "smoke", "--methods", "lora"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "step" in line:
                break
        proc.kill()  # the job had many steps, a fine-tune and pass@1 to go
        seen += proc.stdout.readlines()
    finally:
        proc.kill()
        proc.wait()
    assert any(line.startswith("pretrain step") for line in seen), seen
    assert not any("pass@1 %" in line for line in seen), "the progress line came only with the final table"


# ---------------------------------------------------------------------------------------------------------
# every preset's code path on the CPU, and what mixed precision may not change


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_preset_runs_its_whole_pipeline(name, tmp_path, monkeypatch, capsys):
    """The preset's model shapes and code path, bf16 autocast included (forced on the CPU, as CUDA gets it),
    through the CLI in 2 + 2 steps: pretraining, every method, the JSON and the figure."""
    monkeypatch.setitem(train.PRESETS, name, quick(train.PRESETS[name], bf16=True))
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rows.json"
    status, _, _ = run_main(["--preset", name, "--device", "cpu", "--ranks", "16", "--out", str(out),
                             "--fig", str(tmp_path / "fig.png")], capsys)
    assert status == 0
    doc = json.loads(out.read_text())
    width, layers, rows = train.PRESETS[name].gpt.n_embd, train.PRESETS[name].gpt.n_layer, doc["rows"]
    assert doc["config"]["bf16"] is True and doc["config"]["n_embd"] == width
    assert [row["method"] for row in rows] == train.METHODS
    # parameter parity at the preset's own width: per block, the four adapted linears' in + out sum to 16 C
    assert [row["trainable_params"] for row in rows[2:]] == [16 * 16 * width * layers] * 3
    assert all(math.isfinite(row["val_loss"]) and len(row["curve"]) == 2 for row in rows[1:])
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_bf16_autocast_only_in_the_training_forward(monkeypatch):
    """With bf16 forced (on the CPU here), LoRA and GraLoRA train their forward in bfloat16 alike, and both are
    measured alike outside autocast: val loss and pass@1's decoding in float32."""
    preset = quick(train.PRESETS["smoke"], bf16=True)
    torch.manual_seed(0)
    base_state = GPT(preset.gpt).state_dict()  # an untrained base does: this is about precision, not skill
    forward = GPT.forward
    calls = []

    def recording_forward(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        calls.append((self.training, torch.is_autocast_enabled("cpu"), logits.dtype))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", recording_forward)
    seen = {}
    for method in ("lora", "gralora"):
        calls.clear()
        row = train.finetune(base_state, method, rank=4, preset=preset, log=lambda s: None)
        training = [c for c in calls if c[0]]
        measuring = [c for c in calls if not c[0]]
        assert len(training) == preset.train.finetune_steps and measuring, method
        assert all(autocast and dtype == torch.bfloat16 for _, autocast, dtype in training), (method, training)
        assert all(not autocast and dtype == torch.float32 for _, autocast, dtype in measuring), (method, measuring)
        tasks = train.tasks_for(preset.train)
        val = train.encode_tasks(tasks.val, CharTokenizer())
        assert row["val_loss"] == train.completion_loss(row["model"], val, "cpu")  # float32, as recomputed
        seen[method] = [phase for phase, _ in itertools.groupby(c[:2] for c in calls)]  # runs of one kind
    # the same phases in the same order (decoding may stop after more or fewer tokens, so not the same count)
    assert seen["lora"] == seen["gralora"]


# ---------------------------------------------------------------------------------------------------------
# the report: the table and the figure


def test_table_and_figure(tmp_path):
    rows = []
    for seed in (0, 1):
        for method, rank in (("lora", 4), ("lora", 8), ("gralora", 4), ("gralora", 8)):
            r, k, hybrid_r = train.adapter_spec(method, rank)
            rows.append(dict(method=method, r=r, k=k, hybrid_r=hybrid_r, seed=seed, rank_budget=rank,
                             trainable_params=100 * rank, adapter_flops_per_token=400 * rank,
                             val_loss=1.0 / rank + 0.01 * seed, pass_at_1=0.05 * rank + 0.01 * seed, seconds=1.0))
        rows.append(dict(method="fft", r=None, k=None, hybrid_r=None, seed=seed, rank_budget=None,
                         trainable_params=10**5, adapter_flops_per_token=0, val_loss=0.1, pass_at_1=0.9, seconds=2.0))
    rows[1].update(diverged=True, val_loss=None, pass_at_1=None)  # lora rank 8, seed 0
    table = report.format_table(rows)
    assert "±" in table and len(table.splitlines()) == 2 + 5
    lora_8 = table.splitlines()[3].split()
    assert lora_8[:2] == ["lora", "8"] and lora_8[-3:] == ["2", "(1", "diverged)"]
    assert lora_8[6:9] == ["0.1350", "±", "0.0000"]  # the mean of the seed that did not diverge
    report.plot_sweep(rows, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def legend_methods(ax):
    """{method: colour} of the lines in an axis's legend (labels start with the method's name)."""
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()
               if not line.get_label().startswith("_")}  # the reference lines (fft, base)
    for container in ax.containers:  # errorbar lines
        colours[container.get_label()] = container.lines[0].get_color()
    return {label.split()[0].rstrip(":"): colour for label, colour in colours.items()}


def test_figure_to_a_file_leaves_pyplot_alone(tmp_path):
    """Saving the figure neither switches matplotlib's backend (a notebook would stop showing figures) nor leaves
    a figure open in pyplot; with no adapter rows, the val-loss axis stays linear."""
    import matplotlib
    import matplotlib.pyplot as plt

    rows = [dict(method=method, r=None, k=None, hybrid_r=None, seed=seed, rank_budget=None, trainable_params=10,
                 adapter_flops_per_token=0, val_loss=0.3 + 0.01 * seed, pass_at_1=0.5, seconds=1.0)
            for method in ("base", "fft") for seed in (0, 1)]
    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        figures = plt.get_fignums()
        fig = report.plot_sweep(rows, str(tmp_path / "fig.png"))
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        plt.switch_backend(before)
    assert fig.axes[0].get_yscale() == "linear" and (tmp_path / "fig.png").stat().st_size > 10_000


def test_sweep_figure_colours_and_scales():
    rows = []
    for method, rank, loss in (("lora", 4, 0.30), ("lora", 16, 9.0), ("gralora", 4, 0.29), ("gralora", 16, 0.28),
                               ("hybrid", 4, 0.31)):
        r, k, hybrid_r = train.adapter_spec(method, rank)
        rows.append(dict(method=method, r=r, k=k, hybrid_r=hybrid_r, seed=0, rank_budget=rank,
                         trainable_params=100 * rank, adapter_flops_per_token=0, val_loss=loss, pass_at_1=0.25,
                         seconds=1.0))
    for method, loss in (("fft", 0.3), ("base", 0.33)):
        rows.append(dict(method=method, r=None, k=None, hybrid_r=None, seed=0, rank_budget=None,
                         trainable_params=10**5, adapter_flops_per_token=0, val_loss=loss, pass_at_1=0.5, seconds=2.0))
    import matplotlib.colors

    fig = report.plot_sweep(rows)
    loss_ax, pass_ax = fig.axes
    assert loss_ax.get_yscale() == "log"  # the stalled lora r=16 does not flatten the rest
    for ax in (loss_ax, pass_ax):
        colours = legend_methods(ax)
        assert set(colours) == set(report.METHOD_COLORS)
        for method, colour in colours.items():
            assert matplotlib.colors.same_color(colour, report.METHOD_COLORS[method]), method
    pass_lines = [c.lines[0] for c in pass_ax.containers]
    assert all(list(line.get_ydata()) == [25.0] * len(line.get_ydata()) for line in pass_lines)  # percent
    assert len(set(report.METHOD_COLORS.values())) == len(report.METHOD_COLORS) and set(report.METHOD_COLORS) == set(
        train.METHODS)


@pytest.mark.parametrize("stalled", [False, True])
def test_sweep_figure_can_be_read(stalled):
    """The README's figure, from the committed sweep (and with a stalled run added, on a log axis): enough
    labelled val-loss ticks to read every point, the FFT band in the legend, Hybrid's absence at rank 64 said."""
    rows = json.loads((pathlib.Path(ROOT) / "results" / "sweep_cpu.json").read_text())["rows"]
    if stalled:
        rows = rows + [dict(rows[-1], seed=3, val_loss=2.5)]  # gralora rank 64: mean 0.7, std 1.2
    fig = report.plot_sweep(rows)
    loss_ax = fig.axes[0]
    fig.canvas.draw()
    low, high = loss_ax.get_ylim()
    labelled = [label for label in loss_ax.yaxis.get_ticklabels(which="both")
                if label.get_text() and low <= label.get_position()[1] <= high]
    assert len(labelled) >= 4, [label.get_text() for label in labelled]
    assert loss_ax.get_yscale() == ("log" if stalled else "linear")
    legend = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert "fft ± std over seeds" in legend, legend
    assert "hybrid (ranks ≤ 16 only, as in the paper)" in legend, legend
