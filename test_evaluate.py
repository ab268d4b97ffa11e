"""Tests of passes(), the contained execution of model-written code: what it judges, and on each platform's path.

    python -m pytest -q test_evaluate.py

A list of correct, wrong, broken and hostile programs (attacks on a file outside the sandbox and on another
process), each judged right, none touching what lies outside its sandbox; programs that hang, judged failed
within the timeout.

passes() picks its guards in one place, tiny_gpt.evaluate._guards(), from what the platform has: `resource`
(rlimits), os.setsid and os.killpg (process groups), os.waitid (waiting without reaping). Each path below
removes some of these, as on macOS before Python 3.13 or on Windows, and then checks

  * that the path was really taken: _guards() sees the removal, the child reports the rlimits and the process
    group it got, and spies count the calls that only that path makes;
  * every verdict: pass, wrong answer, exception, early exits, a crash, a flood of output, faked output,
    and hangs, which must be judged failed within the timeout plus MARGIN;
  * that passes() neither raises nor warns on an ordinary program (a warning means the child never got its
    guards set, and a verdict reached that way would be no verdict at all).
These forced paths run on Linux only (as CI does); the hostile list runs everywhere.
"""

import collections
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid
import warnings

import pytest

from conftest import GOOD, TEST
from tiny_gpt import evaluate
from tiny_gpt.evaluate import passes

try:
    import resource  # POSIX only: imported here, before a forced path can make it unimportable
except ImportError:
    resource = None
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="forces the other platforms' paths from Linux, "
                                "as CI does")
MARGIN = 1.5  # seconds passes() may take beyond its timeout: killing and reaping the child, under load
HANG = 0.5  # the timeout given to programs that hang: any hang ends only by it, however long it is


# ---------------------------------------------------------------- what passes() judges: hostile programs


def hostile_programs(victim, bystander_pid):
    """(name, program, expected) triples: the correct program, wrong and broken ones, and attacks on a file
    outside the sandbox (`victim`) and on another process (`bystander_pid`, a harmless sleeping Python)."""
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
        ("shutil.rmtree outside", "import shutil\nshutil.rmtree(" + d + ")\n" + GOOD, False),
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


HOSTILE = [name for name, _, _ in hostile_programs(pathlib.Path("victim"), 0)]


@pytest.mark.parametrize("name", HOSTILE)
def test_passes_judges_each_program_right(tmp_path, name):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    mode = victim.stat().st_mode
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        program, expected = {n: (p, e) for n, p, e in hostile_programs(victim, bystander.pid)}[name]
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
    assert passes(program, TEST, timeout=HANG) is False
    assert time.monotonic() - start < HANG + MARGIN


def test_hostile_list_is_complete():
    """28 programs, each name once (the test above finds each program by its name)."""
    assert len(HOSTILE) == len(set(HOSTILE)) == 28


# ---------------------------------------------------------------- each platform's path, forced

# Each path: (as if on ..., attributes of os removed, `resource` importable, sys.platform).
PATHS = {
    "all guards (Linux)": ([], True, "linux"),
    "macOS, Python 3.10-3.12": (["waitid"], True, "darwin"),
    "macOS, Python 3.13": ([], True, "darwin"),
    "no rlimits": ([], False, "linux"),
    "no process groups": (["setsid", "killpg"], True, "linux"),
    "Windows": (["waitid", "setsid", "killpg"], False, "win32"),
}

# (name, program, test, timeout, expected verdict); a timeout of HANG marks the hangs.
CASES = [
    ("pass", GOOD, TEST, 5.0, True),
    ("pass, prints and writes in its sandbox", "print('hi ☃')\nopen('x.txt', 'w').write('ok')\n" + GOOD, TEST,
     5.0, True),
    ("wrong answer", "def f(x):\n    return x\n", TEST, 5.0, False),
    ("exception", "def f(x):\n    raise ValueError(x)\n", TEST, 5.0, False),
    ("syntax error", "def f(x)\n    return x + 1\n", TEST, 5.0, False),
    ("sys.exit(0) before the asserts", GOOD + "import sys\nsys.exit(0)\n", TEST, 5.0, False),
    ("os._exit(0) between the asserts", "def f(x):\n    if x == 41:\n        import os\n        os._exit(0)\n"
     "    return x + 1\n", TEST, 5.0, False),
    ("crash (abort) in the asserts", "def f(x):\n    import os\n    os.abort()\n", TEST, 5.0, False),
    ("fakes a nonce and exits 0", GOOD + "print('0123456789abcdef' * 2)\nimport os\nos._exit(0)\n", TEST, 5.0,
     False),
    ("stdout flood", GOOD + "print('x' * 2_000_000)\n", TEST, 5.0, False),
    ("hang, busy", "while True:\n    pass\n", TEST, HANG, False),
    ("hang, asleep", "import time\ntime.sleep(60)\n", TEST, HANG, False),
    ("hang, after the asserts", GOOD, TEST + "while True:\n    pass\n", HANG, False),
]


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Force one platform path; yields (expected guards, spy counts); kills any child left behind."""
    removed, has_resource, platform = PATHS[request.param]
    for name in removed:
        monkeypatch.delattr(os, name)
    if not has_resource:
        monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.setattr(sys, "platform", platform)
    limits = ["RLIMIT_CPU", "RLIMIT_FSIZE"] + ([] if platform == "darwin" else ["RLIMIT_AS"])
    expected = {"limits": limits if has_resource else [], "process_group": "killpg" not in removed,
                "wait_without_reaping": "waitid" not in removed}

    calls = collections.Counter()
    for name in ["waitid", "killpg"]:
        if hasattr(os, name):
            monkeypatch.setattr(os, name, counted(calls, name, getattr(os, name)))
    children = []

    class SpiedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            children.append(self)

        def kill(self):
            calls["Popen.kill"] += 1
            super().kill()

        def wait(self, timeout=None):
            calls["Popen.wait with a timeout" if timeout is not None else "Popen.wait"] += 1
            return super().wait(timeout)

    monkeypatch.setattr(subprocess, "Popen", SpiedPopen)
    yield expected, calls
    for child in children:  # only after a failure: a child that passes() left running
        if child.poll() is None:
            subprocess.Popen.kill(child)
            subprocess.Popen.wait(child)


def counted(calls, name, function):
    def spy(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return spy


def judge(program, test, timeout):
    """passes() in a watchdog thread: (verdict, seconds, warnings). Fails, rather than hangs, if passes()
    runs past timeout + MARGIN; fails if it raises."""
    result = {}

    def run():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result["verdict"] = passes(program, test, timeout=timeout)
            result["warnings"] = [str(w.message) for w in caught]
        except BaseException as error:  # noqa: B036  (reported below)
            result["error"] = error

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + MARGIN)
    seconds = time.monotonic() - start
    assert not thread.is_alive(), f"passes() still running after {seconds:.1f} s (timeout {timeout} s)"
    assert "error" not in result, f"passes() raised {result.get('error')!r}"
    return result["verdict"], seconds, result["warnings"]


def assert_path_taken(expected, calls):
    """The spies saw the calls that only the expected path makes, and none of the other path's."""
    if expected["wait_without_reaping"]:
        assert calls["waitid"] > 0 and calls["Popen.wait with a timeout"] == 0, calls
    else:
        assert not hasattr(os, "waitid") and calls["Popen.wait with a timeout"] > 0, calls
    if expected["process_group"]:
        assert calls["killpg"] > 0 and calls["Popen.kill"] == 0, calls
    else:
        assert not hasattr(os, "killpg") and calls["Popen.kill"] > 0, calls


@linux_only
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_passes_verdicts_on_each_path(path, case):
    expected, calls = path
    name, program, test, timeout, verdict = case
    assert evaluate._guards() == expected
    got, seconds, caught = judge(program, test, timeout)
    assert got is verdict, name
    assert caught == [], name  # the child set its guards: the verdict is the program's
    assert_path_taken(expected, calls)
    if timeout == HANG:
        assert seconds >= timeout  # it was the timeout that ended it
    else:
        assert seconds < 4.0  # ended by the child's exit, not by the timeout


@linux_only
def test_child_gets_the_guards_of_its_path(path):
    """The child reports its own rlimits and process group: what _guards() promised is what it got."""
    expected, calls = path
    caps = {"RLIMIT_AS": 512 * 2**20, "RLIMIT_CPU": 3, "RLIMIT_FSIZE": 2**20}  # passes(memory_mb=512, timeout=2)
    for name, cap in caps.items():
        limit = getattr(resource, name)
        inherited = resource.getrlimit(limit)[0]  # what the child has if it sets nothing
        assert inherited != cap  # so the probe tells the two apart
        want = cap if name in expected["limits"] else inherited
        probe = f"import resource\nassert resource.getrlimit(resource.{name})[0] == {want}\n"
        assert judge(probe, "", 2.0)[:1] == (True,), name
    group = expected["process_group"]
    assert judge(f"import os\nassert (os.getpgid(0) == os.getpid()) is {group}\n", "", 2.0)[:1] == (True,)
    assert_path_taken(expected, calls)


@linux_only
def test_a_guard_that_cannot_be_set_fails_and_warns():
    """If the child cannot set a guard it was asked for, the program is judged failed, loudly: here an
    address-space cap too large for setrlimit (OverflowError in the child, as macOS gives ValueError)."""
    assert "RLIMIT_AS" in evaluate._guards()["limits"]
    with pytest.warns(RuntimeWarning, match="before its guards were set"):
        assert passes(GOOD, TEST, memory_mb=2**60) is False


def marked_processes(marker):
    """Pids of live (not zombie) processes whose command line contains `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # it ended while we looked
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.append(int(pid))
    return pids


@linux_only
@pytest.mark.parametrize("path", [name for name, (removed, *_) in PATHS.items() if "killpg" not in removed],
                         indirect=True)  # without process groups only the child is killed (see evaluate.py)
@pytest.mark.parametrize("end", ["exits", "hangs"])
def test_process_group_kills_stray_grandchildren(path, end, tmp_path):
    """A program that starts a process (undoing the harness's ban, as an accident could) leaves nothing
    running, whether it ends by itself or by the timeout: on every path with process groups."""
    expected, calls = path
    marker = str(tmp_path / f"grandchild-{uuid.uuid4().hex}")  # it creates this file once it runs
    grandchild = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)"
    program = (
        "import sys\n"
        "del sys.modules['subprocess'], sys.modules['_posixsubprocess']\n"
        "import subprocess\n"
        "subprocess._USE_POSIX_SPAWN = False  # the harness disabled os.posix_spawn\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}, {marker!r}])\n"
        "import os, time\n"
        f"while not os.path.exists({marker!r}):  # until the grandchild runs\n"
        "    time.sleep(0.01)\n" + GOOD
    )
    test = TEST + ("while True:\n    pass\n" if end == "hangs" else "")
    try:
        verdict, _, caught = judge(program, test, 1.0 if end == "hangs" else 5.0)
        assert verdict is (end == "exits") and caught == []
        assert os.path.exists(marker)  # the grandchild did run
        deadline = time.monotonic() + 2.0  # SIGKILL is asynchronous: give the kernel a moment to act on it
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marked_processes(marker) == []
        assert_path_taken(expected, calls)
    finally:
        for pid in marked_processes(marker):
            os.kill(pid, 9)
