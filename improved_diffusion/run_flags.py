"""
The resolved flags of a training run, saved beside its checkpoints.

image_train.py and super_res_train.py write `flags.json` in the log directory
before the first step; sampling scripts read it from the folder of
`--model_path`, so the path alone is enough to rebuild the model.
"""

import json
import os

import blobfile as bf

from .io_util import atomic_write_json

FLAGS_FILENAME = "flags.json"


def write_run_flags(log_dir, flags):
    """Save a dict of flags (JSON-serializable values) as log_dir/flags.json."""
    atomic_write_json(os.path.join(log_dir, FLAGS_FILENAME), dict(flags))


def read_run_flags(model_path):
    """The flags saved by the run that wrote `model_path`, or None if it saved none."""
    path = bf.join(bf.dirname(model_path), FLAGS_FILENAME)
    if not bf.exists(path):
        return None
    with bf.BlobFile(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete or fix it") from exc
