"""
One rank of the multi-process dist_util test (run by tests/test_dist_util.py
under mpiexec or torchrun, or alone). Usage:

    _dist_worker.py OUT_DIR GOOD_CKPT MISSING_PATH TRUNCATED_CKPT [GOOD_CKPT MISSING_PATH TRUNCATED_CKPT ...]

Writes OUT_DIR/rank<R>.json with what this rank observed (for each three
checkpoints: the good one's weight sum, the errors of the other two).
"""

import json
import os
import sys
import tempfile

import torch

from improved_diffusion import dist_util, logger
from improved_diffusion.io_util import CheckpointError


def checkpoint_error(path):
    try:
        dist_util.load_state_dict(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def default_log_dir(scratch):
    """The logger's default folder (a new one under `scratch`) as this rank sees it."""
    os.environ.pop("OPENAI_LOGDIR", None)
    tempfile.tempdir = scratch
    logger.configure(format_strs="")
    return logger.get_dir()


def main(out_dir, *checkpoints):
    dist_util._BROADCAST_CHUNK_BYTES = 1000  # several chunks even for a small file
    dist_util.setup_dist()
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    params = [torch.full((3,), float(rank)), torch.full((2, 2), float(rank) + 10)]
    dist_util.sync_params(params)
    read = [
        {"weight_sum": float(dist_util.load_state_dict(good, map_location="cpu")["weight"].sum()),
         "missing_error": checkpoint_error(missing), "truncated_error": checkpoint_error(truncated)}
        for good, missing, truncated in (checkpoints[i : i + 3] for i in range(0, len(checkpoints), 3))
    ]
    mean = dist_util.all_reduce_mean(torch.tensor([float(rank)]))
    result = {
        "rank": rank,
        "world_size": dist_util.get_world_size(),
        "is_main": dist_util.is_main_process(),
        "device": str(dist_util.dev()),
        "backend": torch.distributed.get_backend(),
        "synced": [p.flatten().tolist() for p in params],
        "checkpoints": read,
        "mean": mean.item(),
        "gathered": dist_util.all_gather_object(rank * 2),
        "broadcast": dist_util.broadcast_object(f"from {rank}"),
        "mpi4py_imported": sys.modules.get("mpi4py") is not None,
        "log_dir": default_log_dir(out_dir),
    }
    dist_util.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist_util.cleanup_dist()


if __name__ == "__main__":
    main(*sys.argv[1:])
