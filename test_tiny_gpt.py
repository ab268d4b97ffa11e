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
import itertools
import json
import math
import os
import subprocess
import sys
import time

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
    table = report.format_table(rows)
    assert "±" in table and len(table.splitlines()) == 2 + 5
    report.plot_sweep(rows, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------
# the CLI's usage errors, its output files, its progress lines


def run_main(argv, capsys):
    """`python -m tiny_gpt argv` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_refuses_unwritable_output_paths_before_training(tmp_path, capsys):
    """A bad --out or --fig is a one-line usage error (exit 2) naming the path and why, before any training."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(["--out", str(a_file / "rows.json")], f"{a_file} is not a folder"),
             (["--out", str(tmp_path)], "is a folder, not a file"),
             (["--fig", str(a_file / "sub" / "fig.png")], f"{a_file} is not a folder"),
             (["--fig", str(tmp_path / "fig.xyz")], "cannot write 'xyz' files")]
    if sys.platform.startswith("linux"):  # a folder that cannot be created
        cases.append((["--out", "/proc/nope/x.json"], "cannot create the folder /proc/nope"))
    for args, why in cases:
        status, out, err = run_main(["--preset", "smoke", "--cache-dir", str(tmp_path / "cache")] + args, capsys)
        assert status == 2, args
        assert len(err.strip().splitlines()) == 1 and why in err and args[1] in err, err
        assert out == "" and not (tmp_path / "cache").exists()  # nothing ran


def test_cli_refuses_unavailable_devices(capsys):
    bad = ["foo", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"])
    for name in bad:
        status, out, err = run_main(["--preset", "smoke", "--device", name], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert f"device '{name}' is not available here; available: cpu" in err
    assert train.parse_device("cpu") == torch.device("cpu")


def fake_training(monkeypatch, on_finetune=lambda n: None):
    """Replace pretraining and fine-tuning in the CLI by instant fakes that return well-formed rows."""
    calls = []

    def finetune(base_state, method, rank=None, k=None, hybrid_r=None, seed=0, preset=None, device=None):
        calls.append(method)
        on_finetune(len(calls))
        return dict(method=method, r=rank, k=k, hybrid_r=hybrid_r, seed=seed, trainable_params=10,
                    val_loss=1.0 / len(calls), pass_at_1=0.5, seconds=0.1, lr=1e-2, rank_budget=rank,
                    adapter_flops_per_token=0, curve=[], model=None)

    monkeypatch.setattr(cli, "pretrain", lambda *args, **kwargs: ({}, True))
    monkeypatch.setattr(cli, "finetune", finetune)
    return calls


def test_cli_creates_a_missing_output_folder_and_says_so(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch)
    out = tmp_path / "new" / "deeper" / "rows.json"
    status, stdout, _ = run_main(["--preset", "smoke", "--methods", "lora", "gralora", "--out", str(out)], capsys)
    assert status == 0
    assert f"created folder {out.parent} for --out" in stdout
    assert [row["method"] for row in json.loads(out.read_text())] == ["lora", "gralora"]
    assert os.listdir(out.parent) == ["rows.json"]  # no temporary or probe file left behind


def test_cli_keeps_the_rows_when_out_fails_mid_run(tmp_path, monkeypatch, capsys):
    """The --out folder vanishes after the first run: the rows go to a fallback file in the current directory,
    stderr names it, and the job ends with status 1 instead of losing the runs in a traceback."""
    folder = tmp_path / "results"

    def sabotage(n):
        if n == 2:  # after the first row was written: the folder becomes a file
            for name in os.listdir(folder):
                os.remove(folder / name)
            folder.rmdir()
            folder.write_text("")

    fake_training(monkeypatch, sabotage)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    status, stdout, stderr = run_main(["--preset", "smoke", "--methods", "base", "lora", "gralora",
                                       "--out", str(folder / "rows.json")], capsys)
    assert status == 1
    fallback = [name for name in os.listdir(cwd) if name.endswith(".json")]
    assert len(fallback) == 1 and fallback[0] in stderr and str(folder / "rows.json") in stderr
    rows = json.loads((cwd / fallback[0]).read_text())
    assert [row["method"] for row in rows] == ["base", "lora", "gralora"]
    assert "gralora" in stdout  # the table was printed too


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "rows.json"
    train.write_json(str(path), [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    with pytest.raises(TypeError):  # fails half-way through serialising: the old file stays whole
        train.write_json(str(path), [3, object()])
    assert json.loads(path.read_text()) == [1, 2] and os.listdir(tmp_path) == ["rows.json"]
    with pytest.raises(OSError):
        train.write_json(str(tmp_path / "missing" / "rows.json"), [])


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


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_quick_preset_runs_its_whole_pipeline(preset, tmp_path):
    """The preset's model shapes and code path (bf16 autocast forced on the CPU, as CUDA gets it) end to end:
    pretraining, every method, the paper's rule for k, the table, the JSON and the figure, in 2 + 2 steps."""
    out = tmp_path / "rows.json"
    rank = 64 if preset == "gpu" else 16  # k = 4 on the gpu preset's width 384, k = 2 on the cpu preset's 128
    result = subprocess.run([sys.executable, "-m", "tiny_gpt", "--preset", preset, "--quick", "--bf16", "on",
                             "--device", "cpu", "--ranks", str(rank), "--hybrid-max-r", str(rank),
                             "--out", str(out), "--fig", str(tmp_path / "fig.png"),
                             "--cache-dir", str(tmp_path / "cache")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["base", "fft", "lora", "gralora", "hybrid"]
    width = train.PRESETS[preset].gpt.n_embd
    adapters = rows[2:]
    assert [row["trainable_params"] for row in adapters] == [adapters[0]["trainable_params"]] * 3
    assert adapters[0]["trainable_params"] % (rank * width) == 0  # the preset's own width
    assert rows[3]["k"] == (4 if rank >= 64 else 2)
    assert all(math.isfinite(row["val_loss"]) and len(row["curve"]) == 2 for row in rows[1:])
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert "(quick)" in result.stdout


def test_bf16_autocast_only_in_the_training_forward(monkeypatch):
    """With bf16 forced (on the CPU here), LoRA and GraLoRA train their forward in bfloat16 alike, and both are
    measured alike outside autocast: val loss and pass@1's decoding in float32."""
    preset = train.quick(train.PRESETS["smoke"])
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, bf16=True))
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
# the figure


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
    assert loss_ax.get_yscale() == "log"  # the diverged lora r=16 does not flatten the rest
    for ax in (loss_ax, pass_ax):
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()
                   if not line.get_label().startswith("_")}  # the reference lines (fft, base)
        for container in ax.containers:  # errorbar lines
            colours[container.get_label()] = container.lines[0].get_color()
        assert set(colours) == set(report.METHOD_COLORS)
        for method, colour in colours.items():
            assert matplotlib.colors.same_color(colour, report.METHOD_COLORS[method]), method
    pass_lines = [c.lines[0] for c in pass_ax.containers]
    assert all(list(line.get_ydata()) == [25.0] * len(line.get_ydata()) for line in pass_lines)  # percent
    assert len(set(report.METHOD_COLORS.values())) == len(report.METHOD_COLORS) and set(report.METHOD_COLORS) == set(
        train.METHODS)
