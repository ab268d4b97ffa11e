"""pass@1 by contained execution: complete each held-out prompt greedily, run it against its asserts.

`passes(program, test)` runs untrusted, model-written code. It does so in a separate Python process that,
before the program starts, caps its memory, CPU time and file sizes, works in a fresh temporary directory,
and disables the obvious ways to do harm (shell, subprocess, fork, exec, kill, deleting or renaming files,
writing files outside its directory). The parent kills the child's whole process group afterwards.

This is NOT a security boundary. It stops accidents (an infinite loop, a memory bomb, a stray `os.remove`)
made by a tiny model, not an adversary: Python code can undo every one of these patches (ctypes, reloading
modules, walking frames). For real untrusted code, use a container or VM with no network and no host mounts.

How a pass is recognised: the parent sends a random nonce on stdin; the harness reads it before any program
code runs and prints it only after the last assert has passed. The parent counts a pass only if the process
exited with status 0 AND printed the nonce as its last line, so a program that exits early with status 0
(sys.exit(0), os._exit(0)) before its asserts ran cannot look like a success.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .data import STOP

# The child's program. It runs with `python -I` (isolated: no user site-packages, no PYTHON* variables, so
# no PYTHONOPTIMIZE that would strip the asserts) and its working directory is the fresh sandbox directory.
_HARNESS = r'''
import _io, builtins, io, json, os, posix, resource, signal, sys

job = json.loads(sys.stdin.read())  # the nonce is read before any program code runs
nonce, program, test = job["nonce"], job["program"], job["test"]
mem, cpu, fsize = job["memory_bytes"], job["cpu_seconds"], job["file_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))  # a memory bomb ends in MemoryError
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))  # a busy loop gets SIGXCPU even if the parent is late
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # no file (stdout included) grows past this
sandbox = os.path.realpath(os.getcwd())


def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in the sandbox")
    return refused


# os re-exports these from posix; patch both so neither name reaches the real function.
DISABLED = ["system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp", "kill", "killpg",
            "execv", "execve", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
            "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "link", "symlink",
            "chdir", "chroot", "mkdir", "makedirs", "mkfifo", "mknod", "utime", "setxattr", "removexattr",
            "pidfd_open"]
for module in (os, posix):
    for name in DISABLED:
        if hasattr(module, name):
            setattr(module, name, refuse(name))
signal.pidfd_send_signal = refuse("pidfd_send_signal")
for name in ["subprocess", "_posixsubprocess", "multiprocessing", "pty", "ctypes", "_ctypes"]:
    sys.modules[name] = None  # importing a module set to None raises ImportError


def inside(path):
    real = os.path.realpath(path)
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
os.open = posix.open = guarded_os_open

namespace = {"__name__": "__main__"}
exec(compile(program, "<program>", "exec"), namespace)
exec(compile(test, "<test>", "exec"), namespace)
sys.stdout.write("\n" + nonce + "\n")  # reached only if the program and every assert ran to the end
sys.stdout.flush()
'''


def passes(program: str, test: str, timeout: float = 2.0, memory_mb: int = 512) -> bool:
    """True if `program` and then every assert in `test` run to the end in a contained child process.

    Not a security boundary (see the module docstring): it contains accidents, not attacks.

    Args:
        program: Python source that defines the function under test.
        test: Python source with the asserts, run in the same namespace after `program`.
        timeout: wall-clock seconds before the child's process group is killed (a failure).
        memory_mb: address-space cap of the child.

    Returns:
        True only if the child exited with status 0 and printed the nonce last; an exception, a failed
        assert, an early exit, a crash, a limit hit or a timeout all give False.
    """
    nonce = secrets.token_hex(16)
    job = dict(nonce=nonce, program=program, test=test, memory_bytes=memory_mb * 2**20,
               cpu_seconds=int(timeout) + 1, file_bytes=2**20)
    with tempfile.TemporaryDirectory(prefix="passes-") as sandbox, tempfile.TemporaryFile() as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS],
            stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL,
            cwd=sandbox, start_new_session=True,  # its own process group, so we can kill all it started
        )
        try:
            try:
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the child died before reading its job
                pass
            # Wait for the child to exit WITHOUT reaping it (WNOWAIT): while it is a zombie its pid, which
            # is also its process group id, cannot be reused, so the killpg below cannot hit a stranger.
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
                time.sleep(0.005)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child, if still running, and anything it started
            except ProcessLookupError:
                pass
            returncode = proc.wait()
        stdout.seek(0)
        lines = stdout.read().decode(errors="replace").splitlines()
    return returncode == 0 and bool(lines) and lines[-1] == nonce


@torch.no_grad()
def complete(model, tokenizer, prompts, max_new_tokens=160, batch_size=512):
    """Greedy completions of `prompts`, each cut just after its first stop sequence (a blank line).

    Prompts are decoded `batch_size` at a time, left-padded to a common length (see GPT.generate); sorting
    them by length first keeps the padding small.
    """
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
    """Share of `tasks` whose greedy completion passes its asserts (pass@1 with greedy decoding).

    Decoding is batched on the model's device; the programs then run `workers` at a time (each in its own
    process, so threads are enough to overlap them).
    """
    completions = complete(model, tokenizer, [task.prompt for task in tasks], max_new_tokens)
    jobs = [(task.prompt + completion, task.test) for task, completion in zip(tasks, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: passes(*job, timeout=timeout), jobs))
    return sum(results) / len(results)
