"""Tests for tiny_gpt/: the model, the toy data, the contained execution, training and the CLI.

Run from the repository root:

    python -m pytest -q test_tiny_gpt.py

Everything is small, seeded and on the CPU. What is checked:
  * model: shapes; causality (a future token never changes an earlier logit); batched, left-padded, cached
    greedy decoding equals decoding each prompt alone by full recomputation (the oracle);
  * data: the tokenizer round-trips and names an unknown character; the same seed gives the same data; the
    held-out tasks are compositions absent from training; every reference solution passes its own test;
  * passes(): a list of correct, wrong, broken and hostile programs, each judged right, none hanging, none
    touching a file outside its sandbox;
  * training: a short fine-tune lowers the loss; LoRA, GraLoRA and Hybrid train equally many parameters at
    the same rank budget; bad arguments raise ValueError naming them; the pretraining cache is reused, and a
    corrupt or mismatched cache file is rebuilt;
  * the CLI: `python -m tiny_gpt --preset smoke --out FILE` end to end, and the sweep figure.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import gralora
from tiny_gpt import data, train
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
# passes(): contained execution

GOOD = "def f(x):\n    return x + 1\n"
TEST = "assert f(1) == 2\nassert f(41) == 42\n"


def hostile_programs(victim, bystander_pid):
    """(name, program, expected) triples: the correct program, wrong and broken ones, and attacks on a file
    outside the sandbox (`victim`) and on another process (`bystander_pid`, a harmless `sleep`)."""
    v = repr(str(victim))
    d = repr(str(victim.parent))
    return [
        ("correct", GOOD, True),
        ("correct, writes inside its sandbox", "open('scratch.txt', 'w').write('ok')\n" + GOOD, True),
        ("wrong answer", "def f(x):\n    return x\n", False),
        ("syntax error", "def f(x)\n    return x + 1\n", False),
        ("raises", "def f(x):\n    raise RuntimeError('no')\n", False),
        ("missing function", "def g(x):\n    return x + 1\n", False),
        ("prints the right-looking output", "print('True')\nprint('OK')\ndef f(x):\n    return 0\n", False),
        ("sys.exit(0) before the asserts", GOOD + "import sys\nsys.exit(0)\n", False),
        ("exit in f", "def f(x):\n    import sys\n    sys.exit(0)\n", False),
        ("os._exit(0) before the asserts", GOOD + "import os\nos._exit(0)\n", False),
        ("memory bomb", "x = bytearray(8 * 2**30)\n" + GOOD, False),
        ("list memory bomb", "x = [0] * 2**31\n" + GOOD, False),
        ("stdout flood", GOOD + "print('x' * 2_000_000)\n", False),  # passes only without the file-size cap
        ("os.fork", "import os\nos.fork()\n" + GOOD, False),
        ("subprocess", "import subprocess\nsubprocess.run(['rm', " + v + "])\n" + GOOD, False),
        ("os.system", "import os\nos.system('rm " + str(victim) + "')\n" + GOOD, False),
        ("os.remove outside", "import os\nos.remove(" + v + ")\n" + GOOD, False),
        ("shutil.rmtree outside", "import shutil\nshutil.rmtree(" + repr(str(victim.parent)) + ")\n" + GOOD, False),
        ("overwrite outside", "open(" + v + ", 'w').write('pwned')\n" + GOOD, False),
        ("os.open outside", "import os\nos.open(" + v + ", os.O_WRONLY | os.O_TRUNC)\n" + GOOD, False),
        ("rename outside", "import os\nos.rename(" + v + ", 'stolen')\n" + GOOD, False),
        ("kill a process", f"import os, signal\nos.kill({bystander_pid}, signal.SIGKILL)\n" + GOOD, False),
        ("pidfd kill", f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({bystander_pid}), 9)\n" + GOOD,
         False),
        ("io.FileIO outside", "import io\nio.FileIO(" + v + ", 'w').write(b'pwned')\n" + GOOD, False),
        ("_io.open outside", "import _io\n_io.open(" + v + ", 'w').write('pwned')\n" + GOOD, False),
        ("os.open with dir_fd", "import os\nos.open('precious.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=os.open("
         + d + ", os.O_RDONLY))\n" + GOOD, False),
        ("fchmod outside", "import os\nos.fchmod(os.open(" + v + ", os.O_RDONLY), 0)\n" + GOOD, False),
        ("mkdir outside", "import os\nos.mkdir(" + repr(str(victim.parent / "made")) + ")\n" + GOOD, False),
    ]


@pytest.mark.parametrize("index", range(28))
def test_passes_judges_each_program_right(tmp_path, index):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    mode = victim.stat().st_mode
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        name, program, expected = hostile_programs(victim, bystander.pid)[index]
        assert passes(program, TEST) is expected, name
        assert bystander.poll() is None, name  # the other process lives
    finally:
        bystander.kill()
        bystander.wait()
    assert victim.read_text() == "keep me" and victim.stat().st_mode == mode, name  # untouched, outside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"], name  # nothing created outside


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n",
                                     "def f(x):\n    while True:\n        pass\n"])
def test_passes_times_out(program):
    start = time.monotonic()
    assert passes(program, TEST, timeout=1.0) is False
    assert time.monotonic() - start < 1.0 + 2.0


def test_hostile_list_is_complete(tmp_path):
    assert len(hostile_programs(tmp_path / "x", 0)) == 28  # keep the parametrize range above in step


# ---------------------------------------------------------------------------------------------------------
# training


def smoke_preset(**train_changes):
    preset = train.PRESETS["smoke"]
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **train_changes))


def test_short_finetune_lowers_the_loss(tmp_path):
    preset = smoke_preset(pretrain_steps=20, finetune_steps=20, eval_every=10)
    base_state, _ = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=lambda s: None)
    base = train.finetune(base_state, "base", preset=preset, log=lambda s: None)
    for method in ("lora", "gralora"):
        row = train.finetune(base_state, method, rank=4, preset=preset, log=lambda s: None)
        assert row["val_loss"] < base["val_loss"] - 0.01, method  # seeded: the same margin every run
        assert [step for step, _, _ in row["curve"]] == [10, 20]
        assert row["lr"] == preset.train.lr_adapter
    assert base["lr"] is None
    with pytest.raises(ValueError, match="'sgd'"):
        preset.train.lr_for("sgd")


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_equal_trainable_params_at_equal_rank(rank):
    counts = {}
    for method in ("lora", "gralora", "hybrid"):
        model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))
        r, k, hybrid_r = train.adapter_spec(method, rank)
        gralora.add_adapters(model, train.TARGETS, method="lora" if method == "lora" else "gralora",
                             r=r, k=k, hybrid_r=hybrid_r)
        counts[method] = gralora.count_trainable_params(model)
    assert counts["lora"] == counts["gralora"] == counts["hybrid"] == rank * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)


def test_adapter_spec_follows_the_paper_and_rejects_bad_values():
    assert train.adapter_spec("lora", 16) == (16, 1, 0)
    assert train.adapter_spec("gralora", 16) == (16, 2, 0)
    assert train.adapter_spec("gralora", 64) == (64, 4, 0)
    assert train.adapter_spec("hybrid", 16) == (8, 2, 8)
    with pytest.raises(ValueError, match="rank=0"):
        train.adapter_spec("lora", 0)
    with pytest.raises(ValueError, match="r=6 .* not divisible by k=4"):
        train.adapter_spec("gralora", 6, k=4)
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by k=4"):
        train.adapter_spec("gralora", 8, k=4, width=30)
    with pytest.raises(ValueError, match="method='dora'"):
        train.adapter_spec("dora", 8)
    with pytest.raises(ValueError, match="unknown preset 'laptop'"):
        train.get_preset("laptop")
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        train.finetune({}, "dora", preset="smoke")


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
    assert not cached and any("unreadable" in m for m in messages)

    saved = torch.load(path, weights_only=True)
    saved["config"]["pretrain_steps"] = 999  # a file whose stored config differs from the one asked for
    torch.save(saved, path)
    _, cached = train.pretrain(preset.gpt, preset.train, "cpu", cache_dir=str(tmp_path), log=messages.append)
    assert not cached and any("another config" in m for m in messages)

    # every field pretraining reads is in the key: a change gives a new file, never stale weights
    for field, value in dict(pretrain_steps=3, pretrain_lr=1e-4, pretrain_batch=3, pretrain_seed=7,
                             pretrain_weight_decay=0.0, corpus_programs=77, data_seed=5, warmup_frac=0.3,
                             min_lr_frac=0.5, grad_clip=0.1).items():
        other = smoke_preset(**{"pretrain_steps": 2, field: value})
        assert train.cache_path(other.gpt, other.train, str(tmp_path)) != path, field
    # ... and fine-tuning fields are not: they never make pretraining run again
    same = smoke_preset(pretrain_steps=2, finetune_steps=99, lr_adapter=0.5, n_test=7)
    assert train.cache_path(same.gpt, same.train, str(tmp_path)) == path


# ---------------------------------------------------------------------------------------------------------
# the CLI and the report


def test_cli_smoke_end_to_end(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, TINY_GPT_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "tiny_gpt", "--preset", "smoke", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["base", "fft", "lora", "gralora", "hybrid"]
    types = dict(method=str, r=(int, type(None)), k=(int, type(None)), hybrid_r=(int, type(None)),
                 seed=(int, type(None)), trainable_params=int, val_loss=float, pass_at_1=(int, float),
                 seconds=(int, float))
    for row in rows:
        for key, kind in types.items():
            assert isinstance(row[key], kind), (key, row)
        assert 0.0 <= row["pass_at_1"] <= 1.0
    adapters = [row for row in rows if row["r"] is not None]
    assert len({row["trainable_params"] for row in adapters}) == 1  # parameter parity
    assert "pass@1" in result.stdout and "adapter FLOPs/tok" in result.stdout
    assert os.listdir(tmp_path / "cache")  # the base model went to the cache directory asked for


def test_cli_rejects_impossible_runs_before_training():
    result = subprocess.run([sys.executable, "-m", "tiny_gpt", "--preset", "smoke", "--ranks", "6", "--k", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not divisible by k=4" in result.stderr


def test_cli_refuses_bad_lr_adapter():
    """A bad --lr-adapter is a usage error (exit 2, naming the value) before any training."""
    for bad in ("0", "-2", "nan"):
        result = subprocess.run([sys.executable, "-m", "tiny_gpt", "--preset", "smoke", "--lr-adapter", bad],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"got {float(bad)}" in result.stderr

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
    table = train.format_table(rows)
    assert "±" in table and len(table.splitlines()) == 2 + 5
    train.plot_sweep(rows, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000
