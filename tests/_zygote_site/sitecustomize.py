"""
An interpreter that another program starts under the suite (a rank of
mpiexec or torchrun, a script a benchmark runs) hands its script to the
suite's launch server, which runs it in a child forked with torch already
imported (about 2.5 CPU-s saved each); this interpreter stands in for that
child until it ends.

tests/_zygote.forking_env puts this folder on PYTHONPATH and names the
server's socket in ZYGOTE_SERVER. Only an interpreter started as
`python [-u] script.py ...` hands off; any other goes on as usual. The
stand-in passes the child its environment, folder, argv and every open file
descriptor (its stdio, and the PMI socket MPICH's ranks inherit), forwards
the signals a launcher sends, and exits with the child's status. The child
kills itself if the stand-in dies (kill -9), so no rank outlives its
launcher. Standard library only: it runs before anything is imported.
"""

import os
import sys

SERVER_VAR = "ZYGOTE_SERVER"
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _options():
    """The interpreter's options before the script (`-u` for `python -u script.py`)."""
    return sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]


def _runs_a_script():
    """Whether this interpreter was started as `python [-u] script.py ...` with a server to go to."""
    if not os.environ.get(SERVER_VAR):
        return False
    script = sys.argv[0] if sys.argv else ""
    return _options() in ([], ["-u"]) and not script.startswith("-") and os.path.isfile(script)


def _script_env():
    """This process's environment less what the suite added to reach the server."""
    env = dict(os.environ)
    del env[SERVER_VAR]
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != here]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _open_fds():
    """Every file descriptor open in this process."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            continue
        fds.append(int(name))
    return sorted(fds)


def _read_line(conn, pending):
    """(one JSON line from `conn`, what follows it); the line is None if the server closed first."""
    import json

    while b"\n" not in pending:
        chunk = conn.recv(4096)
        if not chunk:
            return None, pending
        pending += chunk
    line, pending = pending.split(b"\n", 1)
    return json.loads(line), pending


def _stand_in():
    """
    Hand the script to the server, forward signals to its child, and exit as
    the child exits. Where the server cannot be reached, the error is printed
    and this interpreter runs the script itself; once it has the script, a
    failure ends this one (status 1), so the script never runs twice.
    """
    import json
    import signal
    import socket

    fds = _open_fds()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ[SERVER_VAR])
    forwarded = [getattr(signal, name) for name in FORWARDED]
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    unbuffered = _options() == ["-u"] or bool(os.environ.get("PYTHONUNBUFFERED"))
    request = {"argv": sys.argv, "env": _script_env(), "cwd": os.getcwd(), "unbuffered": unbuffered, "fds": fds}
    ended = None
    try:
        socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], fds)
        started, pending = _read_line(conn, b"")
        if started is not None:
            for signum in forwarded:
                signal.signal(signum, lambda signum, frame: os.kill(started["started"], signum))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
            ended, _ = _read_line(conn, pending)
    except OSError as error:
        sys.stderr.write(f"the suite's launch server failed: {error}\n")
    if ended is None:
        sys.stderr.write("the suite's launch server ended before the script did\n")
        os._exit(1)
    code = ended["returncode"]
    if code < 0:  # end by the child's signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if _runs_a_script():
    _stand_in()
