"""
The resolved flags of a training run, saved beside its checkpoints.

The training scripts write `flags.json` in the log directory before the first
step (every flag of the script, as parsed); sampling scripts read it from the
folder of `--model_path`, so the path alone is enough to rebuild the model.
"""

import json
import os

import blobfile as bf

from .errors import InputError
from .io_util import atomic_write_json

FLAGS_FILENAME = "flags.json"


def write_run_flags(log_dir, flags):
    """Save a dict of flags (JSON-serializable values) as log_dir/flags.json."""
    atomic_write_json(os.path.join(log_dir, FLAGS_FILENAME), dict(flags))


def read_run_flags(model_path):
    """
    The flags saved by the run that wrote `model_path` (from the flags.json
    in its folder), or None if it saved none. Files written before
    --null_label existed get it from their --class_dropout_prob, which
    decided the null label then.

    :raises InputError: naming the file when it is not a JSON object.
    """
    path = bf.join(bf.dirname(model_path), FLAGS_FILENAME)
    if not bf.exists(path):
        return None
    with bf.BlobFile(path, "r") as f:
        try:
            flags = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); delete or fix it") from None
    if not isinstance(flags, dict):
        raise InputError(f"{path} holds a JSON {type(flags).__name__}, not the object of flags a training run writes")
    if "class_dropout_prob" in flags and "null_label" not in flags:
        flags["null_label"] = flags["class_dropout_prob"] > 0
    return flags
