"""The suite's forked launcher (_zygote.run_python) runs a script as a fresh interpreter does."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _zygote import run_command, run_python, start_command, start_python

PROBE = """
import json, os, sys
import torch
print(json.dumps({
    "name": __name__, "argv": sys.argv, "path0": sys.path[0], "extra": [p for p in sys.path if p.startswith("/x")],
    "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"), "threads": torch.get_num_threads(),
    "mpi_loaded": "mpi4py" in sys.modules, "ours_loaded": any(m.startswith("improved_diffusion") for m in sys.modules),
    "session_leader": os.getsid(0) == os.getpid(),
}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def fresh(args, env, cwd):
    return subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True)


def test_a_forked_launch_sees_what_a_fresh_interpreter_sees(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PROBE_VAR="42", OMP_NUM_THREADS="1", PYTHONPATH="/x/one")
    forked = run_python([script, 3, "--flag"], env=env, cwd=tmp_path)
    expected = fresh([script, 3, "--flag"], env, tmp_path)
    assert (forked.returncode, forked.stderr) == (3, "to stderr\n")
    assert (forked.returncode, forked.stdout, forked.stderr) == (expected.returncode, expected.stdout.replace(
        '"session_leader": false', '"session_leader": true'), expected.stderr)
    assert '"session_leader": true' in forked.stdout


def test_console_scripts_of_this_interpreter_fork_and_other_programs_run_as_they_are(tmp_path):
    """A script whose #! line is this interpreter (as pip writes torchrun) runs as `python script` does, forked."""
    console, shell = tmp_path / "probe", tmp_path / "shell"
    console.write_text(f"#!{sys.executable}\n{PROBE}")
    shell.write_text('#!/bin/sh\necho "$0 $1"\nexit 4\n')
    for program in (console, shell):
        program.chmod(0o755)
    env = dict(os.environ, PROBE_VAR="7", OMP_NUM_THREADS="1")
    forked = run_command([console, 5, "--flag"], env=env, cwd=tmp_path)
    expected = subprocess.run([str(console), "5", "--flag"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert '"session_leader": true' in forked.stdout
    assert (forked.returncode, forked.stdout, forked.stderr) == (expected.returncode, expected.stdout.replace(
        '"session_leader": false', '"session_leader": true'), expected.stderr)
    other = run_command([shell, "x"])
    assert (other.returncode, other.stdout) == (4, f"{shell} x\n")


def test_started_console_scripts_take_signals(tmp_path):
    console = tmp_path / "wait"
    console.write_text(f"#!{sys.executable}\nimport pathlib, time\nprint('up', flush=True)\n"
                       f"pathlib.Path({str(tmp_path / 'up')!r}).touch()\ntime.sleep(60)\n")
    console.chmod(0o755)
    started = start_command([console])
    assert not isinstance(started, subprocess.Popen), "a console script of this interpreter forks"
    while not (tmp_path / "up").exists():
        assert started.poll() is None
        time.sleep(0.02)
    started.send_signal(signal.SIGTERM)
    assert started.communicate(timeout=30) == ("up\n", "") and started.returncode == -signal.SIGTERM


def test_exceptions_and_relative_script_paths_behave_as_in_python(tmp_path):
    (tmp_path / "boom.py").write_text("raise ValueError('boom')\n")
    result, expected = run_python(["boom.py"], cwd=tmp_path), fresh(["boom.py"], None, tmp_path)
    assert (result.returncode, result.stderr) == (expected.returncode, expected.stderr)
    assert result.returncode == 1 and result.stderr.rstrip().endswith("ValueError: boom")


def test_a_launch_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_python([script], timeout=1)
    assert time.monotonic() - start < 30
    assert "started" in caught.value.output
    assert run_python([script.with_name("missing.py")]).returncode == 2  # a fresh interpreter's "can't open file"


def test_a_launch_signalled_as_it_starts_ends_by_the_signal_without_output(tmp_path):
    script = tmp_path / "quiet.py"
    script.write_text("import time\ntime.sleep(60)\n")
    launch = start_python([script])
    launch.send_signal(signal.SIGKILL)
    assert launch.communicate(timeout=30) == ("", "") and launch.returncode == -signal.SIGKILL


def test_started_launches_run_side_by_side_and_take_signals(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text("import sys, time\nprint('up', flush=True)\ntime.sleep(float(sys.argv[1]))\nsys.exit(int(sys.argv[2]))\n")
    slow, quick = start_python([script, 60, 0]), start_python([script, 0.2, 7])
    assert slow.poll() is None
    assert quick.wait(timeout=30) == 7 and quick.communicate() == ("up\n", "")
    os.killpg(slow.pid, signal.SIGTERM)
    assert slow.communicate(timeout=30) == ("up\n", "") and slow.returncode == -signal.SIGTERM


def test_variables_read_when_torch_loads_take_effect(tmp_path):
    script = tmp_path / "logs.py"
    script.write_text("import os\nimport torch._logging._internal as logs\n"
                      "print(os.getppid(), logs.log_state.is_artifact_enabled('recompiles'))\n")
    plain, logged = (run_python([script], env=dict(os.environ, **extra)).stdout.split() for extra in
                     ({}, {"TORCH_LOGS": "recompiles"}))
    assert plain[1] == "False" and logged[1] == "True"
    # Each is forked from a server of its own.
    assert len({plain[0], logged[0], str(os.getpid())}) == 3


ENDINGS = {
    "atexit": "import atexit, sys\natexit.register(print, 'at exit')\nsys.stdout.write('buffered')\n",
    "thread": "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), print('joined'))).start()\n",
    "message": "import sys\nprint('out')\nsys.exit('a message')\n",
    "interrupt": "raise KeyboardInterrupt\n",
}


@pytest.mark.parametrize("name", sorted(ENDINGS))
def test_a_launch_ends_as_python_ends(tmp_path, name):
    """Exit handlers, running threads, buffered output and the exit status: as in a real interpreter."""
    script = tmp_path / f"{name}.py"
    script.write_text(ENDINGS[name])
    forked, expected = run_python([script], cwd=tmp_path), fresh([script], None, tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (expected.returncode, expected.stdout, expected.stderr)
