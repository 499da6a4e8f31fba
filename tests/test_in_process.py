"""
The suite's in-process runner (_in_process.run_in_process): a script ends
with the status and output a fresh interpreter gives it, and leaves this
process as it found it.
"""

import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from _in_process import run_in_process
from _launch import run_python

ENDINGS = {
    "returns": "import sys\nprint('out')\nprint('err', file=sys.stderr)\n",
    "exit_status": "import sys\nprint(sys.argv[1:])\nsys.exit(3)\n",
    "exit_message": "import sys\nsys.exit('a message')\n",
    "uncaught": "import sys\nprint('before', flush=True)\nraise ValueError('boom')\n",
    "warning": "import warnings\nwarnings.warn('careful', UserWarning)\nwarnings.warn('old', DeprecationWarning)\n",
}


@pytest.mark.parametrize("name", sorted(ENDINGS))
def test_a_script_ends_as_in_a_fresh_interpreter(tmp_path, name):
    script = tmp_path / f"{name}.py"
    script.write_text(ENDINGS[name])
    ran, fresh = run_in_process(script, ["a", 1], cwd=tmp_path), run_python([script, "a", 1], cwd=tmp_path)
    assert (ran.returncode, ran.stdout) == (fresh.returncode, fresh.stdout)
    if name == "uncaught":  # the traceback's frames differ (runpy's here), not its end
        assert ran.returncode == 1 and "Traceback" in ran.stderr
        assert ran.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "ValueError: boom"
    else:
        assert ran.stderr == fresh.stderr


CHANGES = """
import os, random, signal, sys
import numpy as np
import torch
from improved_diffusion import dist_util, logger

assert os.getcwd() == sys.argv[1] and os.environ["ONLY_HERE"] == "1" and torch.get_num_threads() == 2
assert sys.path[0] == os.path.dirname(os.path.abspath(__file__))
os.environ["LEFT_BEHIND"] = "1"
os.chdir("/")
sys.path.insert(0, "/nowhere")
torch.set_num_threads(3)
torch.manual_seed(5), np.random.seed(5), random.seed(5)
torch.set_grad_enabled(False)
signal.signal(signal.SIGTERM, lambda *_: None)
logger.configure(dir=sys.argv[1], format_strs=["log"])
dist_util.setup_dist()
print(torch.rand(1).item())
"""


def seed_and_state(seed=None):
    """(what a script may change in this process, a draw of each global generator) after seeding them with `seed`."""
    if seed is not None:
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    return (dict(os.environ), os.getcwd(), list(sys.path), torch.get_num_threads(), torch.is_grad_enabled(),
            signal.getsignal(signal.SIGTERM))


def draws():
    return torch.rand(1).item(), np.random.rand(), random.random()


def test_a_script_leaves_this_process_as_it_found_it(tmp_path):
    from improved_diffusion import dist_util, logger

    script = tmp_path / "changes.py"
    script.write_text(CHANGES)
    before = seed_and_state(1)
    expected = draws()
    seed_and_state(1)
    env = dict(os.environ, ONLY_HERE="1", OMP_NUM_THREADS="2")
    result = run_in_process(script, [tmp_path], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert seed_and_state() == before and draws() == expected
    assert not dist_util.is_initialized() and logger.Logger.CURRENT is None
