"""pass@1 by contained execution: complete each held-out prompt greedily, run it against its asserts.

`passes(program, test)` runs model-written code in a separate Python process that, before the program starts,
works in a fresh temporary directory, disables the obvious ways to do harm (shell, subprocess, fork, exec,
kill, deleting or renaming files, writing files outside its directory) and, where the platform allows, caps its
memory, CPU time and file sizes. After a wall-clock timeout, or once the child has exited, the parent kills it
and, where there are process groups, everything it started. This is a guard against accidents (an infinite loop,
a memory bomb, a stray `os.remove` by a tiny model), not a security boundary: Python code can undo every one of
these patches (ctypes, reloading modules, walking frames). For untrusted code, use a container or VM.

Which guards hold where (`_guards()` is the one place that looks at the platform):

    guard                                    Linux  macOS, Py 3.13+  macOS, Py 3.10-3.12  Windows
    wall-clock timeout, then a kill; fresh   yes    yes              yes                  yes
      temp dir; patched os, open, subprocess;
      stdout over 1 MiB is a failure
    CPU-time and file-size caps (rlimits)    yes    yes              yes                  no (timeout only)
    memory cap (RLIMIT_AS)                   yes    no (1)           no (1)               no
    own process group, killed as a whole     yes    yes              yes (2)              no: the child only (3)

    (1) macOS rejects RLIMIT_AS (setrlimit fails with EINVAL) and would not enforce it anyway.
    (2) without os.waitid (macOS before Python 3.13) the child is reaped before its group is killed, so in
        that instant its pid could in principle be reused.
    (3) nothing should be left behind: the harness removes the ways to start processes (os.system, os.spawn*,
        os.startfile, subprocess, multiprocessing); nothing would kill it if something were.

A pass needs exit status 0 AND, as the last line, a random nonce that the harness reads from stdin before any
program code runs and prints only after the last assert, so an early sys.exit(0) or os._exit(0) is no pass. The
harness first prints a line once its guards are set; a child that stops before it is judged failed AND passes()
warns, so a broken harness cannot pass for a model that fails every task.
"""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from .data import STOP

_READY = "passes: guards set"  # the harness's first line, printed before any program code runs
_OUTPUT_BYTES = 2**20  # a child that prints more has failed (and, with rlimits, can write no bigger file)

# The child's program. It runs with `python -I` (isolated: no user site-packages, no PYTHON* variables, so
# no PYTHONOPTIMIZE that would strip the asserts) and its working directory is the fresh sandbox directory.
_HARNESS = r'''
import _io, builtins, io, json, os, signal, sys

job = json.loads(sys.stdin.read())  # the nonce is read before any program code runs
nonce, program, test = job["nonce"], job["program"], job["test"]
if job["limits"]:  # the parent found `resource` (POSIX); a limit that cannot be set stops the child: a failure
    import resource
    for name, value in job["limits"].items():  # RLIMIT_AS: a memory bomb ends in MemoryError; RLIMIT_CPU:
        limit = getattr(resource, name)        # a busy loop gets SIGXCPU even if the parent is late;
        hard = resource.getrlimit(limit)[1]    # RLIMIT_FSIZE: no file (stdout included) grows past the cap
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
sys.stdout.reconfigure(encoding="utf-8")  # as on Linux; Windows would use its code page for a file
sandbox = os.path.normcase(os.path.realpath(os.getcwd()))


def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in the sandbox")
    return refused


DISABLED = ["system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp", "kill", "killpg",
            "execv", "execve", "spawnv", "spawnve", "startfile", "remove", "unlink", "rmdir", "removedirs",
            "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
            "fchown", "lchown", "link", "symlink", "chdir", "chroot", "mkdir", "makedirs", "mkfifo", "mknod",
            "utime", "setxattr", "removexattr", "pidfd_open"]
for module in (os, sys.modules[os.name]):  # os re-exports these from posix (nt on Windows): patch both
    for name in DISABLED:
        if hasattr(module, name):
            setattr(module, name, refuse(name))
signal.pidfd_send_signal = refuse("pidfd_send_signal")
for name in ["subprocess", "_posixsubprocess", "_winapi", "multiprocessing", "pty", "ctypes", "_ctypes"]:
    sys.modules[name] = None  # importing a module set to None raises ImportError


def inside(path):
    real = os.path.normcase(os.path.realpath(path))
    return real == sandbox or real.startswith(sandbox + os.sep)


real_open, real_os_open, real_FileIO = io.open, os.open, io.FileIO
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guarded_open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and set(mode) & set("wax+") and not inside(file):
        raise PermissionError(f"writing {file!r} outside the sandbox is disabled")
    return real_open(file, mode, *args, **kwargs)


def guarded_os_open(path, flags, *args, **kwargs):
    if kwargs.get("dir_fd") is not None:  # a path relative to another directory: inside() cannot judge it
        raise PermissionError("os.open with dir_fd is disabled in the sandbox")
    if flags & WRITE_FLAGS and not inside(path):
        raise PermissionError(f"writing {path!r} outside the sandbox is disabled")
    return real_os_open(path, flags, *args, **kwargs)


class GuardedFileIO(real_FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} outside the sandbox is disabled")
        super().__init__(file, mode, *args, **kwargs)


builtins.open = io.open = _io.open = guarded_open
io.FileIO = _io.FileIO = GuardedFileIO
os.open = sys.modules[os.name].open = guarded_os_open

print(job["ready"], flush=True)  # every guard is set
namespace = {"__name__": "__main__"}
exec(compile(program, "<program>", "exec"), namespace)
exec(compile(test, "<test>", "exec"), namespace)
print("\n" + nonce, flush=True)  # reached only if the program and every assert ran to the end
'''


def _guards() -> dict:
    """The guards this platform gives passes(): the only place in this module that looks at the platform."""
    try:
        import resource  # noqa: F401  (POSIX only)
        limits = ["RLIMIT_CPU", "RLIMIT_FSIZE"] + ([] if sys.platform == "darwin" else ["RLIMIT_AS"])  # see (1)
    except ImportError:
        limits = []
    return {
        "limits": limits,  # the rlimits the child sets on itself
        "process_group": hasattr(os, "setsid") and hasattr(os, "killpg"),  # POSIX: a new session, killpg
        "wait_without_reaping": hasattr(os, "waitid"),  # Linux; macOS from Python 3.13
    }


def passes(program: str, test: str, timeout: float = 2.0, memory_mb: int = 512) -> bool:
    """True if `program` and then every assert in `test` run to the end in a contained child process; False on an
    exception, a failed assert, an early exit, a crash, a limit hit or a timeout. Never raises: what cannot be
    judged is judged failed, with a RuntimeWarning when the child could not start or set up its guards.

    Args:
        program: Python source that defines the function under test.
        test: Python source with the asserts, run in the same namespace after `program`.
        timeout: wall-clock seconds before the child (and its process group, where there is one) is killed.
        memory_mb: address-space cap of the child, where the platform has one (Linux).
    """
    guards = _guards()
    nonce = secrets.token_hex(16)
    caps = {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": int(timeout) + 1, "RLIMIT_FSIZE": _OUTPUT_BYTES}
    job = dict(nonce=nonce, ready=_READY, program=program, test=test,
               limits={name: caps[name] for name in guards["limits"]})
    try:
        with tempfile.TemporaryDirectory(prefix="passes-", ignore_cleanup_errors=True) as sandbox, \
                tempfile.TemporaryFile() as out:
            returncode = _run(job, sandbox, out, timeout, guards)
            size = out.seek(0, os.SEEK_END)
            out.seek(0)
            head = out.read(256).decode(errors="replace")
            out.seek(max(0, size - 256))
            tail = out.read().decode(errors="replace")
    except OSError as error:  # could not make the directory or start Python: nothing was judged
        warnings.warn(f"passes(): could not run the child ({error!r}); the program is judged failed",
                      RuntimeWarning, stacklevel=2)
        return False
    if head.splitlines()[:1] != [_READY]:
        warnings.warn(f"passes(): the child ended (exit status {returncode}) before its guards were set (one "
                      "could not be set, the harness fails here, or the timeout came first); the program is "
                      "judged failed", RuntimeWarning, stacklevel=2)
        return False
    return returncode == 0 and size <= _OUTPUT_BYTES and tail.splitlines()[-1:] == [nonce]


def _run(job, sandbox, out, timeout, guards) -> int:
    """Run the harness on `job` with stdout to the file `out`; kill what is left after `timeout` s; its status."""
    group = guards["process_group"]
    proc = subprocess.Popen([sys.executable, "-I", "-c", _HARNESS], stdin=subprocess.PIPE, stdout=out,
                            stderr=subprocess.DEVNULL, cwd=sandbox, start_new_session=group)
    try:
        with contextlib.suppress(OSError):  # the child died before reading its job (BrokenPipe; EINVAL on Windows)
            proc.stdin.write(json.dumps(job).encode())  # ASCII: json escapes the rest
            proc.stdin.close()
        if guards["wait_without_reaping"]:
            # Wait for the child to exit WITHOUT reaping it (WNOWAIT): while it is a zombie its pid, which
            # is also its process group id, cannot be reused, so the killpg below cannot hit a stranger.
            deadline, flags = time.monotonic() + timeout, os.WEXITED | os.WNOHANG | os.WNOWAIT
            while time.monotonic() < deadline and os.waitid(os.P_PID, proc.pid, flags) is None:
                time.sleep(0.005)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)  # reaps the child if it exits in time
    finally:
        if group:
            with contextlib.suppress(OSError):  # no such group any more (ESRCH), or only zombies in it (EPERM, macOS)
                os.killpg(proc.pid, signal.SIGKILL)  # the child, if still running, and anything it started
        else:
            proc.kill()  # the child only; does nothing once it has been reaped
        returncode = proc.wait()
    return returncode


@torch.no_grad()
def complete(model, tokenizer, prompts, max_new_tokens=160, batch_size=512):
    """Greedy completions of `prompts`, each cut just after its first stop sequence (a blank line). Prompts are
    decoded `batch_size` at a time, sorted by length so that the left padding (see GPT.generate) stays small."""
    device = next(model.parameters()).device
    stop = tokenizer.encode(STOP)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids = [tokenizer.encode(prompts[i]) for i in batch]
        T = max(len(x) for x in ids)
        idx = torch.tensor([[0] * (T - len(x)) + x for x in ids], device=device)  # (B, T), left-padded
        lengths = torch.tensor([len(x) for x in ids])  # (B,)
        out = model.generate(idx, max_new_tokens, stop=stop, lengths=lengths)  # (B, T + n)
        for i, row in zip(batch, out[:, T:].tolist()):
            text = tokenizer.decode(row)
            cut = text.find(STOP)
            completions[i] = text if cut < 0 else text[: cut + len(STOP)]
    model.train(was_training)
    return completions


def pass_at_1(model, tasks, tokenizer, max_new_tokens=160, workers=4, timeout=2.0):
    """Share of `tasks` whose greedy completion passes its asserts (pass@1 with greedy decoding). The programs
    run `workers` at a time (each in its own process, so threads are enough to overlap them)."""
    completions = complete(model, tokenizer, [task.prompt for task in tasks], max_new_tokens)
    jobs = [(task.prompt + completion, task.test) for task, completion in zip(tasks, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: passes(*job, timeout=timeout), jobs))
    return sum(results) / len(results)
