"""
Run a script of this repository in the test's own process, as `python
SCRIPT ARGS` would run it but without starting an interpreter (and
importing torch) again: for every test whose subject is the script's work
and its exit, not a process of its own.
"""

import contextlib
import io
import os
import random
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings

import numpy as np
import torch

from improved_diffusion import dist_util, logger

# The handlers a script may install (training saves on these) and must leave as it found them.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# A fresh interpreter's warning filters (no -W options): DeprecationWarning only from __main__.
DEFAULT_FILTERS = (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                   ("ignore", ImportWarning), ("ignore", ResourceWarning))


def run_in_process(path, args, env=None, cwd=None):
    """
    Run the script `path` with `args` in this process as `python path *args`
    runs it: as __main__, with sys.argv, sys.path[0] its folder, `env` as the
    whole environment (default: this process's; OMP_NUM_THREADS sets torch's
    thread count), in `cwd`, with a fresh interpreter's warning filters.
    Returns a subprocess.CompletedProcess: the exit status (0, SystemExit's
    code, or 1 with the traceback on stderr for an uncaught exception) and
    what it printed on sys.stdout and sys.stderr.

    Afterwards this process is as before: the environment, folder, argv and
    sys.path, torch's thread count and the global generators of torch, NumPy
    and Python, the signal handlers, the logger (reset) and the process group
    (torn down). What only a fresh process gives (variables read as torch
    loads, such as TORCH_LOGS; a first import; interpreter exit) needs a real
    launch (_launch.run_command).
    """
    path, args = str(path), [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _isolated(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [path, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        _interpreter_warnings()
        status = _run(path)
    return subprocess.CompletedProcess([sys.executable, path, *args], status, out.getvalue(), err.getvalue())


def _run(path):
    """Run the script; its exit status as the interpreter would give it."""
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_request:
        code = exit_request.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 (an uncaught exception ends a script with its traceback and status 1)
        traceback.print_exc()
        return 1
    return 0


def _interpreter_warnings():
    """Inside warnings.catch_warnings: the filters of a fresh interpreter, and warnings printed to sys.stderr."""
    warnings.resetwarnings()
    for action, category in DEFAULT_FILTERS:
        warnings.filterwarnings(action, category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


@contextlib.contextmanager
def _isolated(env, cwd):
    """Put back, on leaving, what a script run in this process may change."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_argv, saved_path, saved_tempdir = sys.argv, list(sys.path), tempfile.tempdir
    saved_threads, saved_grad = torch.get_num_threads(), torch.is_grad_enabled()
    saved_numpy, saved_random = np.random.get_state(), random.getstate()
    saved_handlers = {s: signal.getsignal(s) for s in SIGNALS}
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            if os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
            if cwd is not None:
                os.chdir(cwd)
            yield
    finally:
        dist_util.cleanup_dist()
        logger.reset()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.path[:], tempfile.tempdir = saved_argv, saved_path, saved_tempdir
        torch.set_num_threads(saved_threads)
        torch.set_grad_enabled(saved_grad)
        np.random.set_state(saved_numpy)
        random.setstate(saved_random)
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
