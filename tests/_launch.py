"""
Real launches, for the tests whose behavior is a process's own (one and two
ranks under mpiexec and torchrun, signals, kill -9, data-loader workers,
fresh interpreters): every command is an ordinary subprocess in a session of
its own, its output going to temporary files (a process that prints more
than a pipe holds never blocks while a test waits on something else).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launch_env(gpu=False):
    """The environment of a fresh launch that imports this checkout, on CPU (gloo) unless `gpu`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Open MPI refuses to start as root (as in containers) without these; MPICH ignores them.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


class Launch(subprocess.Popen):
    """
    subprocess.Popen(command, start_new_session=True) with stdout and stderr
    in temporary files; communicate() returns them as text once the command
    has ended (raising subprocess.TimeoutExpired, with the output so far, if
    it has not ended within `timeout`).
    """

    def __init__(self, command, env=None, cwd=None):
        self.outputs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        super().__init__([str(c) for c in command], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=self.outputs[0], stderr=self.outputs[1], start_new_session=True)

    def communicate(self, input=None, timeout=None):
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(self.args, timeout, *self.read_outputs()) from None
        return self.read_outputs()

    def read_outputs(self):
        """(stdout, stderr) written so far."""
        texts = []
        for output in self.outputs:
            output.seek(0)
            texts.append(output.read().decode(errors="replace"))
        return tuple(texts)


def start_command(command, env=None, cwd=None):
    """Start `command` (env: the whole environment, default this process's) in its own session; returns a Launch."""
    return Launch(command, env=env, cwd=cwd)


def run_command(command, env=None, cwd=None, timeout=300):
    """
    Run `command` as start_command starts it, to the end; returns a
    subprocess.CompletedProcess with text stdout and stderr. Past `timeout`
    seconds, kills it with every process it started and raises
    subprocess.TimeoutExpired with the output so far.
    """
    proc = start_command(command, env, cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_python(args, env=None, cwd=None, timeout=300):
    """run_command for `python *args` in a fresh interpreter (this one's executable)."""
    return run_command([sys.executable, *args], env, cwd, timeout)


def descendants(pid):
    """The pids of every living process below `pid` (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # ended while listed
                continue
            children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found


def signal_tree(proc, signum):
    """
    Send `signum` to a started command's session and to every process below
    it (torchrun starts each worker in a session of its own), as a scheduler
    signals every process of a job.
    """
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def kill_tree(proc):
    """SIGKILL a started command with every process below it (signal_tree), then reap it."""
    signal_tree(proc, signal.SIGKILL)
    proc.wait()
