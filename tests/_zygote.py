"""
Run Python scripts to the end in fresh processes that skip the import of torch.

Every script launch of the suite spends about 2 s importing torch before it
does any work. `run_python` and `start_python` start each script in a child
forked from a server process (one per test process, started on first use)
that has imported torch (with torch._dynamo, which torch.optim loads), NumPy
and Pillow and done nothing else. The child then runs the script as
`python script.py args` would: its own environment, working folder,
sys.argv, sys.path[0], stdout and stderr, a new session, and its exit status;
improved_diffusion is imported afresh in each. The child ends as the
interpreter would but skips the teardown of its heap, which in a forked child
costs more than the import it saved.

What Python, torch and the C libraries read from the environment when they
load (TORCH*, ATEN_*, ONEDNN_*, PYTHON*, MALLOC_*, ...) is the server's: each
set of those variables gets its own server. Anything that is not a script
path (`-c`, `-m`) starts a real interpreter. A console script of this
interpreter (its `#!` line names sys.executable: torchrun) forks like a
script; mpiexec starts as a subprocess. The ranks either starts are
interpreters that hand their script to the server at once and stand in for
the forked child that runs it (forking_env), which saves each the 2.5
CPU-s of imports.
"""

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# What an interpreter, torch or a C library reads once, at start-up: a launch that sets these differently needs
# a server of its own. (KMP_*, which scikit-learn sets on import, is Intel OpenMP's; torch's Linux wheels use
# GNU OpenMP.)
LOAD_TIME_PREFIXES = ("TORCH", "ATEN_", "ONEDNN_", "DNNL_", "MKL", "GOMP_", "OMP_PROC_BIND", "OMP_PLACES",
                      "PYTHON", "MALLOC_", "LD_", "CUDA_LAUNCH_BLOCKING", "NCCL_")
# Environment variables the child applies itself, or that are read when used (the cache folder torch.compile
# exports on first use).
APPLIED = ("PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR")
# Launchers whose ranks hand their scripts to a server through the stand-in in FORKING_SITE.
RANK_LAUNCHERS = ("mpiexec", "mpirun", "torchrun")
FORKING_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote_site")
SERVER_VAR = "ZYGOTE_SERVER"


def _load_time_vars(env):
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES) and k not in APPLIED}


class Launch:
    """
    A script running in a forked child, with the parts of subprocess.Popen
    the tests use: pid (also its process group), poll(), wait() and
    communicate(), whose stdout and stderr are text read from files.
    """

    def __init__(self, server, args, pid, folder):
        self.server, self.args, self.pid, self.folder = server, args, pid, folder
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid, deadline=time.monotonic())
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid, None if timeout is None else time.monotonic() + timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout, *self._outputs())
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout=None):
        self.wait(timeout)
        outputs = self._outputs()
        self.folder.cleanup()
        return outputs

    def _outputs(self):
        """(stdout, stderr) so far; empty for a child stopped before it took its streams."""
        return tuple(_read_if_there(os.path.join(self.folder.name, name)) for name in ("out", "err"))


def _read_if_there(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class _Server:
    """A forking server process, started with `env` less APPLIED, and the pipe to it."""

    def __init__(self, env):
        self.env = {k: v for k, v in env.items() if k not in APPLIED}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env, cwd=os.path.dirname(os.path.abspath(__file__)))
        self.pending = b""
        self.ended = {}  # pid -> exit status of children whose end was reported
        self.socket = self._read_message()["socket"]  # where stand-ins (forking_env) connect

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        """End the server once its children have ended (killing it after 30 s)."""
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _read_message(self, deadline=None):
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

    def _next(self, deadline=None):
        """Read one message, keeping an exit status; returns the message (None at the deadline)."""
        message = self._read_message(deadline)
        if message is not None and "returncode" in message:
            self.ended[message["pid"]] = message["returncode"]
        return message

    def start(self, args, env, cwd):
        folder = tempfile.TemporaryDirectory(prefix="zygote_")
        request = {"argv": [str(a) for a in args], "env": env, "cwd": str(cwd),
                   "unbuffered": bool(env.get("PYTHONUNBUFFERED")),
                   "stdout": os.path.join(folder.name, "out"), "stderr": os.path.join(folder.name, "err")}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        while "started" not in (message := self._next()):
            pass
        return Launch(self, args, message["started"], folder)

    def returncode(self, pid, deadline):
        """The exit status of child `pid`, waiting until `deadline` (None: for ever); None if still running."""
        while pid not in self.ended:
            if self._next(deadline) is None:
                return None
        return self.ended.pop(pid)


# One server per set of load-time variables (libraries such as scikit-learn and torch.compile add some to
# os.environ as the suite runs).
_servers = {}


def start_python(args, env=None, cwd=None):
    """
    Start `python *args` (args[0] a script path) with `env` (default: this
    process's) in `cwd`, in a new session; returns a Launch (Popen-like).
    """
    env = dict(os.environ if env is None else env)
    return _server_for(env).start(args, env, os.getcwd() if cwd is None else cwd)


def _server_for(env):
    """The running server for the load-time variables of `env`, started if there is none."""
    key = tuple(sorted(_load_time_vars(env).items()))
    if key not in _servers or not _servers[key].alive():
        _servers[key] = _Server(env)
        atexit.register(_servers[key].close)
    return _servers[key]


def run_python(args, env=None, cwd=None, timeout=300):
    """Run `python *args` to the end as run_command does (forked where args[0] is a script)."""
    return run_command([sys.executable, *args], env, cwd, timeout)


def run_command(command, env=None, cwd=None, timeout=300):
    """
    subprocess.run(command, capture_output=True, text=True) for any command
    line, started as start_command starts it; returns a
    subprocess.CompletedProcess. Raises subprocess.TimeoutExpired after
    killing the command's session.
    """
    proc = start_command(command, env, cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def start_command(command, env=None, cwd=None):
    """
    subprocess.Popen(command, stdout=PIPE, stderr=PIPE, text=True,
    start_new_session=True) for any command line; a Launch (forked) where
    it starts this interpreter or one of its console scripts on a script.
    Under mpiexec or torchrun, the ranks that run a script are forked too
    (see forking_env).
    """
    if os.path.basename(str(command[0])) in RANK_LAUNCHERS:
        env = forking_env(env)
    args = _python_args(command)
    if args is not None and _forks(args, cwd):
        return start_python(args, env, cwd)
    return subprocess.Popen([str(c) for c in command], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def forking_env(env=None):
    """
    `env` (default: this process's) made so that an interpreter any program
    starts in it on a script (a rank of mpiexec or torchrun, a benchmark's
    launch) hands the script to a server and stands in for the forked child
    that runs it (_zygote_site/sitecustomize.py).
    """
    env = dict(os.environ if env is None else env)
    env[SERVER_VAR] = _server_for(env).socket
    env["PYTHONPATH"] = os.pathsep.join([FORKING_SITE, *[p for p in [env.get("PYTHONPATH")] if p]])
    return env


def _forks(args, cwd):
    """Whether `python *args` can run forked: args[0] is a script file, not -c or -m."""
    script = str(args[0]) if args else "-"
    cwd = os.getcwd() if cwd is None else cwd
    return hasattr(os, "fork") and not script.startswith("-") and os.path.isfile(os.path.join(cwd, script))


def _python_args(command):
    """The arguments of `python ...` that `command` amounts to, or None for another program."""
    program = str(command[0])
    if program == sys.executable:
        return list(command[1:])
    try:
        with open(program, "rb") as f:
            first_line = f.readline(4096)
    except OSError:
        return None
    return list(command) if first_line.split() == [f"#!{sys.executable}".encode()] else None


# ---------------------------------------------------------------- the server


def _serve():
    """
    Fork one child per request line on stdin, replying {"started": pid} at
    once and {"pid", "returncode"} when a child ends. The first reply,
    {"socket": path}, names where the stand-ins (_zygote_site) connect:
    each gets its child's {"started"} and {"returncode"} on its connection.
    Exit at end of input once every child has ended.
    """
    import numpy  # noqa: F401  (the imports every launch would repeat)
    import PIL.Image  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it: 1.4 s)

    default_threads = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(tempfile.mkdtemp(prefix="zygote_"), "socket"))
    listener.listen(64)
    _reply({"socket": listener.getsockname()})
    pending, open_input = b"", True
    launches, stand_ins = set(), {}  # pids of children started from stdin; pid -> connection of its stand-in
    while open_input or launches or stand_ins:
        waiting = 0.02 if launches or stand_ins else None
        ready = select.select([listener, 0] if open_input else [listener], [], [], waiting)[0]
        if 0 in ready:
            chunk = os.read(0, 65536)
            open_input = bool(chunk)
            pending += chunk
        if listener in ready and (stand_in := _receive_stand_in(listener)) is not None:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _become_handed_script(*stand_in, [listener, *stand_ins.values()], torch, default_threads)
                return
            for fd in stand_in[2]:
                os.close(fd)
            stand_ins[pid] = stand_in[0]
            _send(stand_in[0], {"started": pid})
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _close_sockets([listener, *stand_ins.values()])
                _become_script(json.loads(line), torch, default_threads)
                return
            launches.add(pid)
            _reply({"started": pid})
        for pid, code in _ended(launches):
            launches.discard(pid)
            _reply({"pid": pid, "returncode": code})
        for pid, code in _ended(stand_ins):
            conn = stand_ins.pop(pid)
            _send(conn, {"returncode": code})
            conn.close()
    os.unlink(listener.getsockname())
    os.rmdir(os.path.dirname(listener.getsockname()))


def _ended(pids):
    """(pid, exit status) of each child in `pids` that has ended."""
    ended = []
    for pid in list(pids):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ended.append((pid, os.waitstatus_to_exitcode(status)))
    return ended


def _reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _send(conn, message):
    """Send a JSON line to a stand-in; one that has gone (kill -9) is not an error."""
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass


def _receive_stand_in(listener):
    """
    Accept a stand-in: (its connection, its request, the descriptors it sent,
    in the order of request["fds"]); None if it went before sending it all.
    """
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 256)
    while data and not data.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        data = data + chunk if chunk else b""
    if not data:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    return conn, json.loads(data), fds


def _close_sockets(sockets):
    """Close the server's sockets in a child, leaving no Python object that could close the numbers again."""
    for sock in sockets:
        os.close(sock.detach())


def _become_handed_script(conn, request, fds, server_sockets, torch, default_threads):
    """
    In the forked child of a stand-in: take its descriptors at its
    numbers, die when the stand-in goes, then run the script.
    """
    import fcntl

    _close_sockets(server_sockets)
    high = max([*request["fds"], *fds, conn.fileno()]) + 1
    watched = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD, high))
    _close_sockets([conn])
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, high) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in zip(request["fds"], moved):
        os.dup2(fd, target)
        os.close(fd)
    threading.Thread(target=_die_with, args=(watched,), daemon=True).start()
    os.setsid()
    _run_script(request, torch, default_threads)


def _die_with(conn):
    """SIGKILL this process when the stand-in at the other end of `conn` ends (it sends nothing after its request)."""
    while conn.recv(1):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _become_script(request, torch, default_threads):
    """In the forked child: take the request's streams (files), then run the script."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    _run_script(request, torch, default_threads)


def _run_script(request, torch, default_threads):
    """Take the request's folder, environment and argv, then run the script as `python script.py` would."""
    import runpy

    env = request["env"]
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if request["unbuffered"] else -1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [os.path.dirname(os.path.abspath(script)), *extra]
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or default_threads))
    path = os.path.abspath(script)  # the __file__ and traceback paths Python gives a script
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as request_exit:
        _end(_exit_status(request_exit.code))
    except BaseException as error:
        _print_uncaught(error, path)
        _end(None if isinstance(error, KeyboardInterrupt) else 1)
    _end(0)


def _print_uncaught(error, path):
    """Print the traceback of an exception the script did not catch from its first frame in `path` on."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename != path:
        frames = frames.tb_next
    if frames is not None:
        error.__traceback__ = frames
    sys.excepthook(type(error), error, error.__traceback__)


def _exit_status(code):
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _end(status):
    """
    End the child as the interpreter ends (threads joined, atexit handlers
    run, streams flushed) but skip the heap's teardown: in a forked child
    that touches every object inherited from the server and copies its
    pages, about 1.3 s per launch. None ends by SIGINT, as Python does after
    an uncaught KeyboardInterrupt. Python's C-level exit hooks (Py_AtExit)
    go with the teardown; the one a script here relies on, mpi4py's
    MPI_Finalize, is called as it would be. An MPI rank then leaves through
    the C library's exit(), whose handlers include MPICH's goodbye to its
    launcher (a rank that ends without it has the launcher kill the others).
    """
    threading._shutdown()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    mpi_rank = mpi is not None and mpi.Is_initialized()
    if mpi_rank and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if status is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    if mpi_rank:
        import ctypes

        ctypes.CDLL(None).exit(status)
    os._exit(status)


if __name__ == "__main__":
    _serve()
