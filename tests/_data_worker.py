"""
One rank of the multi-process load_data test (run under mpiexec by
tests/test_image_datasets.py). Usage:

    _data_worker.py GOOD_DIR BAD_DIR OUT_DIR

Writes OUT_DIR/rank<R>.json with this rank's shard of GOOD_DIR and the
error that load_data raised for BAD_DIR.
"""

import json
import os
import sys

from improved_diffusion import dist_util
from improved_diffusion.image_datasets import load_data


def main(good_dir, bad_dir, out_dir):
    dist_util.setup_dist()
    files = load_data(data_dir=good_dir, batch_size=1, image_size=8, num_workers=0).files
    try:
        load_data(data_dir=bad_dir, batch_size=1, image_size=8, num_workers=0)
        error = None
    except ValueError as exc:
        error = str(exc)
    with open(os.path.join(out_dir, f"rank{dist_util.get_rank()}.json"), "w") as f:
        json.dump({"files": files, "error": error}, f)
    dist_util.cleanup_dist()


if __name__ == "__main__":
    main(*sys.argv[1:4])
