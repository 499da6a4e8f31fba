import json
import socket
import subprocess
import sys

import pytest
import torch
from _launch import BIN, LAUNCH_VARS, MPIEXEC, ROOT, launch_env, run_command

from improved_diffusion import dist_util
from improved_diffusion.io_util import CheckpointError

WORKER = ROOT / "tests" / "_dist_worker.py"


@pytest.fixture
def checkpoints(tmp_path):
    """A good checkpoint, a missing path and a truncated copy."""
    good = tmp_path / "model.pt"
    torch.save({"weight": torch.arange(1000.0)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1500])
    return [str(good), str(tmp_path / "missing.pt"), str(truncated)]


def run_workers(launcher, tmp_path, checkpoints, world_size, gpu=False):
    """Run the worker under `launcher` and return each rank's observations, by rank."""
    out = run_command(launcher + [sys.executable, str(WORKER), str(tmp_path)] + checkpoints, env=launch_env(gpu),
                      timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


def check_ranks(results, checkpoints, device="cpu", backend="gloo"):
    world_size = len(results)
    for rank, r in enumerate(results):
        assert r["rank"] == rank and r["world_size"] == world_size
        assert r["is_main"] == (rank == 0)
        assert r["device"] == device and r["backend"] == backend
        assert r["synced"] == [[0.0] * 3, [10.0] * 4]
        assert len(r["checkpoints"]) == len(checkpoints) // 3
        for i, read in enumerate(r["checkpoints"]):
            missing, truncated = checkpoints[3 * i + 1 : 3 * i + 3]
            assert read["weight_sum"] == sum(range(1000))
            assert missing in read["missing_error"]
            assert truncated in read["truncated_error"]
        assert r["mean"] == pytest.approx((world_size - 1) / 2)
        assert r["gathered"] == [2 * k for k in range(world_size)]
        assert r["broadcast"] == "from 0"
    assert len({str(r["checkpoints"]) for r in results}) == 1
    assert len({r["log_dir"] for r in results}) == 1


def test_single_plain_process_does_not_import_mpi4py(tmp_path, checkpoints):
    [result] = run_workers([], tmp_path, checkpoints, 1)
    check_ranks([result], checkpoints)
    assert not result["mpi4py_imported"]


def test_single_plain_process_without_mpi4py_installed(tmp_path, checkpoints):
    hide_mpi4py = (
        "import sys, runpy; sys.modules['mpi4py'] = None; "
        f"sys.argv = ['worker', {str(tmp_path)!r}] + {checkpoints!r}; "
        f"runpy.run_path({str(WORKER)!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", hide_mpi4py], env=launch_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    check_ranks([json.loads((tmp_path / "rank0.json").read_text())], checkpoints)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_single_process_on_gpu_uses_nccl(tmp_path, checkpoints):
    [result] = run_workers([], tmp_path, checkpoints, 1, gpu=True)
    check_ranks([result], checkpoints, device="cuda:0", backend="nccl")


@pytest.mark.skipif(not MPIEXEC, reason="mpiexec not found (pip install mpich mpi4py)")
def test_two_ranks_under_mpiexec(tmp_path, checkpoints):
    results = run_workers([MPIEXEC, "-n", "2"], tmp_path, checkpoints, 2)
    check_ranks(results, checkpoints)
    assert all(r["mpi4py_imported"] for r in results)


def test_two_ranks_under_torchrun_read_pt_and_safetensors_files_through_rank_0(tmp_path, checkpoints):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    good = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"weight": torch.arange(1000.0)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1500])
    checkpoints = [*checkpoints, str(good), str(tmp_path / "missing.safetensors"), str(truncated)]
    launcher = [str(BIN / "torchrun"), "--standalone", "--monitor-interval", "0.1", "--nproc_per_node", "2",
                "--no-python"]
    results = run_workers(launcher, tmp_path, checkpoints, 2)
    check_ranks(results, checkpoints)
    assert not any(r["mpi4py_imported"] for r in results)


def test_mpi_launch_without_mpi4py_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(RuntimeError, match="mpi4py"):
        dist_util._export_rendezvous_from_mpi()


def test_helpers_without_process_group(tmp_path, monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist_util.is_initialized()
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1 and dist_util.is_main_process()
    torch.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    assert dist_util.load_state_dict(str(tmp_path / "a.pt"))["a"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match="missing.pt"):
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(TypeError, match="weights"):
        dist_util.load_state_dict(str(tmp_path / "a.pt"), weights=True)
    assert dist_util.broadcast_object("x") == "x" and dist_util.all_gather_object(3) == [3]


def test_launcher_rank_before_setup(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert dist_util.get_rank() == 3 and dist_util.get_world_size() == 4
    assert not dist_util.is_main_process()


def test_free_port_can_be_bound():
    port = dist_util.find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
