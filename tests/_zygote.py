"""
Run Python scripts to the end in fresh processes that skip the import of torch.

Every script launch of the suite spends about 2 s importing torch before it
does any work. `run_python` starts each script instead in a child forked from
a server process (one per test process, started on first use) that has
imported torch (with torch._dynamo, which torch.optim loads), NumPy and
Pillow and done nothing else. The child then runs the script as
`python script.py args` would: its own environment, working folder,
sys.argv, sys.path[0], stdout and stderr, a new session, and its exit status;
improved_diffusion is imported afresh in each.

What Python, torch and the C libraries read from the environment when they
load (TORCH*, ATEN_*, ONEDNN_*, PYTHON*, MALLOC_*, ...) is the server's: each
set of those variables gets its own server. `fresh=True`, or anything that is
not a script path (`-c`, `-m`), starts a real interpreter. Tests that signal a
running script, or start mpiexec or torchrun, use subprocess themselves.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

# What an interpreter, torch or a C library reads once, at start-up: a launch that sets these differently needs
# a fresh interpreter.
LOAD_TIME_PREFIXES = ("TORCH", "ATEN_", "ONEDNN_", "DNNL_", "MKL", "KMP_", "GOMP_", "OMP_PROC_BIND", "OMP_PLACES",
                      "PYTHON", "MALLOC_", "LD_", "CUDA_LAUNCH_BLOCKING", "NCCL_")
# Environment variables the child applies itself.
APPLIED = ("PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS")


def _load_time_vars(env):
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES) and k not in APPLIED}


class _Server:
    """A forking server process, started with `env` less APPLIED, and the pipe to it."""

    def __init__(self, env):
        self.env = {k: v for k, v in env.items() if k not in APPLIED}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env, cwd=os.path.dirname(os.path.abspath(__file__)))
        self.pending = b""

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if self.alive():
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def read_message(self, deadline=None):
        """The next JSON line from the server; None if `deadline` (time.monotonic) passes first."""
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the launch server ended")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, args, env, cwd, timeout):
        with tempfile.TemporaryDirectory(prefix="zygote_") as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            request = {"argv": [str(a) for a in args], "env": env, "cwd": str(cwd), "stdout": out, "stderr": err}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self.read_message()["pid"]
            deadline = None if timeout is None else time.monotonic() + timeout
            reply = self.read_message(deadline)
            if reply is None:
                os.killpg(pid, signal.SIGKILL)
                self.read_message()
            stdout, stderr = (open(path, errors="replace").read() for path in (out, err))
        if reply is None:
            raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(args, reply["returncode"], stdout, stderr)


# One server per set of load-time variables (libraries such as scikit-learn and torch.compile add some to
# os.environ as the suite runs).
_servers = {}


def run_python(args, env=None, cwd=None, timeout=300, fresh=False):
    """
    Run `python *args` (args[0] a script path) to the end with `env` (default:
    this process's) in `cwd`; returns a subprocess.CompletedProcess with text
    stdout and stderr, as subprocess.run(capture_output=True, text=True) would.
    Raises subprocess.TimeoutExpired after killing the script's session.

    :param fresh: start a real interpreter (for a variable read at start-up,
        such as TORCH_LOGS, that a one-off launch sets).
    """
    env = dict(os.environ if env is None else env)
    cwd = os.getcwd() if cwd is None else cwd
    script = str(args[0])
    if fresh or not hasattr(os, "fork") or script.startswith("-") or not os.path.isfile(os.path.join(cwd, script)):
        return _run_fresh(args, env, cwd, timeout)
    key = tuple(sorted(_load_time_vars(env).items()))
    if key not in _servers or not _servers[key].alive():
        _servers[key] = _Server(env)
        atexit.register(_servers[key].close)
    return _servers[key].run(args, env, cwd, timeout)


def _run_fresh(args, env, cwd, timeout):
    command = [sys.executable, *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------- the server


def _serve():
    """Fork one child per request line on stdin; reply {"pid"} at once and {"returncode"} when it ends."""
    import numpy  # noqa: F401  (the imports every launch would repeat)
    import PIL.Image  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it: 1.4 s)

    default_threads = torch.get_num_threads()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _become_script(request, torch, default_threads)
            return
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})


def _reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _become_script(request, torch, default_threads):
    """In the forked child: take the request's streams, folder, environment and argv, then run the script."""
    import runpy

    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    env = request["env"]
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if unbuffered else -1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [os.path.dirname(os.path.abspath(script)), *extra]
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or default_threads))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _serve()
