"""The suite's forked launcher (_zygote.run_python) runs a script, or a rank of one, as a fresh interpreter does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _launch import BIN, MPIEXEC, launch_env
from _zygote import forking_env, run_command, run_python, start_command, start_python

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


RANK_PROBE = """
import json, os, sys
sys.stdout.write(json.dumps({
    "rank": os.environ.get("RANK") or os.environ.get("PMI_RANK"), "argv": sys.argv, "path0": sys.path[0],
    "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"), "pythonpath": os.environ.get("PYTHONPATH"),
    "server_var": "ZYGOTE_SERVER" in os.environ,
}) + "\\n")  # one write: the ranks share the pipe, and torchrun's run unbuffered
print("forked" if "torch" in sys.modules else "fresh", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def rank_launcher(kind):
    if kind == "mpiexec":
        if MPIEXEC is None:
            pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
        return [MPIEXEC, "-n", "2", sys.executable]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--monitor-interval", "0.1"]


@pytest.mark.parametrize("kind, status", [("mpiexec", 3), ("torchrun", 0)])
def test_ranks_are_forked_and_see_what_fresh_ranks_see(tmp_path, kind, status):
    script = tmp_path / "rank.py"
    script.write_text(RANK_PROBE)
    command = [*rank_launcher(kind), str(script), str(status)]
    env = dict(launch_env(), PROBE_VAR="9", PYTHONPATH="/x/one")
    forked = run_command(command, env=env, cwd=tmp_path)
    expected = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert forked.returncode == expected.returncode == (status if kind == "mpiexec" else 0)
    assert sorted(forked.stdout.splitlines()) == sorted(expected.stdout.splitlines())
    assert [json.loads(line)["rank"] for line in sorted(forked.stdout.splitlines())] == ["0", "1"]
    assert '"server_var": false' in forked.stdout and '"pythonpath": "/x/one"' in forked.stdout
    assert forked.stderr.count("forked") == 2 and expected.stderr.count("fresh") == 2


def test_a_forked_mpi_rank_ending_after_another_is_not_killed(tmp_path):
    """MPICH's launcher kills the ranks still running when one ends without telling it (at C exit)."""
    if MPIEXEC is None:
        pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
    script = tmp_path / "late.py"
    script.write_text("import time\nfrom mpi4py import MPI\nrank = MPI.COMM_WORLD.Get_rank()\nMPI.Finalize()\n"
                      "time.sleep(0.5 * rank)\nprint('rank', rank, 'done', flush=True)\n")
    result = run_command([MPIEXEC, "-n", "2", sys.executable, str(script)], env=launch_env(), cwd=tmp_path)
    assert result.returncode == 0 and sorted(result.stdout.splitlines()) == ["rank 0 done", "rank 1 done"], result


def test_forked_ranks_end_with_a_launcher_killed_by_sigkill(tmp_path):
    if MPIEXEC is None:
        pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
    script = tmp_path / "sleeper.py"
    script.write_text("import os, pathlib, sys, time\n"
                      "pathlib.Path(sys.argv[1], str(os.getpid())).write_text(os.environ['PMI_RANK'])\n"
                      "time.sleep(120)\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    launcher = start_command([MPIEXEC, "-n", "2", sys.executable, str(script), str(pids)], env=launch_env())
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate()
    ranks = [int(p.name) for p in pids.iterdir()]
    while any(os.path.exists(f"/proc/{pid}") for pid in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} outlived their launcher"
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["sys.exit(5)", "os.kill(os.getpid(), signal.SIGTERM)",
                                    "os.kill(os.getpid(), signal.SIGKILL)"])
def test_a_handed_off_script_ends_as_a_fresh_one_does(tmp_path, ending):
    """A script any program starts in forking_env runs forked, and its stand-in ends with its status."""
    script = tmp_path / "end.py"
    script.write_text(f"import os, signal, sys\nprint('torch' in sys.modules, flush=True)\n{ending}\n")
    run = [sys.executable, str(script)]
    handed_off = subprocess.run(run, env=forking_env(), capture_output=True, text=True, timeout=60)
    expected = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert (handed_off.returncode, handed_off.stdout) == (expected.returncode, "True\n")
    assert expected.stdout == "False\n" and expected.returncode in (5, -signal.SIGTERM, -signal.SIGKILL)


def test_an_interpreter_that_cannot_reach_the_server_runs_the_script_itself(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text("import signal, sys\nprint('torch' in sys.modules, signal.pthread_sigmask(signal.SIG_BLOCK, []))\n")
    env = dict(forking_env(), ZYGOTE_SERVER=str(tmp_path / "no_server"))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "False set()\n")
    assert "Error in sitecustomize" in result.stderr and "No such file" in result.stderr
