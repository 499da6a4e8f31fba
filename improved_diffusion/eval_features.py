"""
Features of whole image sets, and their cache on disk: `dataset_features`
runs the FID Inception-v3 over a reader's batches spread across ranks and
gathers them in image order on rank 0; a reference's statistics are cached
in an npz under a fingerprint of its files and of the weights, and reused
while both stay the same.
"""

import hashlib
import json
import os
import sys
import zipfile

import numpy as np
from tqdm.auto import tqdm

from . import dist_util
from .eval_images import NpzImages
from .inception import extract_features
from .io_util import atomic_open
from .sharding import gather_lists

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool")  # what evaluation.reference_statistics caches


def dataset_features(model, reader, batch_size, desc="features"):
    """
    Features of every image of `reader`, batch b on rank b % world_size: each
    batch is the same whatever the number of ranks, and so are its features.

    :return: on rank 0, dict of float32 [N x F] arrays in image order (the
        keys of FIDInceptionV3.forward); None on the other ranks.
    """
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    mine = []
    total = sum(len(range(start, min(start + batch_size, reader.num_images)))
                for index, start in enumerate(range(0, reader.num_images, batch_size)) if index % world_size == rank)
    with tqdm(total=total, desc=desc, unit="image", disable=rank != 0, file=sys.stderr) as bar:
        for index, images in reader.batches(batch_size, wanted=lambda i: i % world_size == rank):
            mine.append((index, extract_features(model, images, dist_util.dev())))
            bar.update(len(images))
    return gather_in_order(mine)


def gather_in_order(parts):
    """Every rank's [(first index, features)] concatenated in index order on rank 0; None elsewhere."""
    parts = gather_lists(parts)
    if parts is None:
        return None
    parts.sort(key=lambda part: part[0])
    return {key: np.concatenate([features[key] for _, features in parts]) for key in parts[0][1]}


def input_fingerprint(reader, weights_path):
    """A digest of the input's files (names, sizes, modification times) and of the weights file's bytes."""
    files = [reader.path] if isinstance(reader, NpzImages) else reader.files
    listing = [(os.path.relpath(f, reader.path), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    identity = [os.path.abspath(reader.path), getattr(reader, "image_size", None), listing]
    if getattr(reader, "image_channels", 3) != 3:
        identity.append(reader.image_channels)
    digest = hashlib.sha256(json.dumps(identity).encode())
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_statistics(path, fingerprint):
    """The statistics cached at `path` for `fingerprint`, or None (no file, another input or other weights)."""
    try:
        with np.load(path) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            return {key: cached[key] for key in STATS_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def save_statistics(path, stats, fingerprint):
    """Write the statistics to `path` atomically; False (and a warning) if the folder is not writable."""
    try:
        with atomic_open(path) as f:
            np.savez(f, fingerprint=np.array(fingerprint), **stats)
    except OSError as exc:
        print(f"warning: cannot cache the reference statistics at {path} ({exc}); they will be computed again",
              file=sys.stderr)
        return False
    return True
