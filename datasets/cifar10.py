"""
Turn the CIFAR-10 python archive into image folders for `load_data`.

Input: `cifar-10-python.tar.gz` as published, or the `cifar-10-batches-py`
folder it unpacks to (or the folder holding that one). Output:

    OUT/train/{class_name}_{index:05d}.png   50,000 images (data_batch_1..5, in order)
    OUT/test/{class_name}_{index:05d}.png    10,000 images (test_batch)

with class names from `batches.meta` (airplane, automobile, ...), so
`load_data(data_dir="OUT/train", class_cond=True)` numbers the classes in
alphabetical order of those names.

The batch files are Python pickles. They are read with an unpickler that only
accepts the few numpy names a pickled uint8 array needs, so a tampered archive
cannot run code; the archive itself is read in memory, never extracted.

    python datasets/cifar10.py cifar-10-python.tar.gz --out_dir data/cifar10
    python datasets/cifar10.py data/cifar-10-python.tar.gz --download   # fetch it first if missing
"""

import argparse
import hashlib
import io
import os
import pickle
import re
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np
from PIL import Image

try:
    from . import prep_util
except ImportError:  # run as a script: python datasets/cifar10.py
    import prep_util

ARCHIVE = "cifar-10-python.tar.gz"
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
META = "batches.meta"
SPLITS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
SIDE = 32
ROW_LENGTH = 3 * SIDE * SIDE

_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild a numpy array."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _needed_files():
    return [META] + [name for names in SPLITS.values() for name in names]


def read_source(source):
    """
    Read the CIFAR-10 batch files from an archive or folder.

    :return: dict file name -> bytes for batches.meta, data_batch_1..5, test_batch.
    """
    if not os.path.exists(source):
        raise prep_util.PrepError(
            f"CIFAR-10 source not found: {source} (expected {ARCHIVE} or a {FOLDER} folder; "
            f"pass --download to fetch the archive from {URL})"
        )
    files = _read_folder(source) if os.path.isdir(source) else _read_archive(source)
    missing = [name for name in _needed_files() if name not in files]
    if missing:
        raise prep_util.PrepError(f"{source} is not a CIFAR-10 python archive: missing {', '.join(missing)}")
    return files


def _read_folder(source):
    if os.path.isdir(os.path.join(source, FOLDER)):
        source = os.path.join(source, FOLDER)
    files = {}
    for name in _needed_files():
        path = os.path.join(source, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def _read_archive(source):
    needed = set(_needed_files())
    files = {}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name in needed:
                    files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise prep_util.PrepError(
            f"cannot read {source} as a gzip-compressed tar archive ({type(exc).__name__}: {exc}); "
            f"expected {ARCHIVE}, whole and uncorrupted"
        ) from exc
    return files


def load_pickle(data, name):
    """Unpickle one batch file safely; keys are returned as str."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can fail in many ways
        raise prep_util.PrepError(f"cannot unpickle {name} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise prep_util.PrepError(f"{name} should hold a dict, found {type(obj).__name__}")
    return {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in obj.items()}


def label_names(files):
    """The class names listed in batches.meta, checked to be usable as file-name prefixes."""
    names = load_pickle(files[META], META).get("label_names")
    if not isinstance(names, list) or not names:
        raise prep_util.PrepError(f"{META} has no label_names list")
    names = [name.decode("utf-8") if isinstance(name, bytes) else name for name in names]
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise prep_util.PrepError(f"{META}: class name {name!r} cannot be a file-name prefix")
    return names


def load_batch(files, name, num_classes):
    """One batch as (images uint8 [N x 32 x 32 x 3], labels list of int)."""
    batch = load_pickle(files[name], name)
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == ROW_LENGTH):
        raise prep_util.PrepError(f"{name}: 'data' should be a uint8 array [N x {ROW_LENGTH}]")
    if not (isinstance(labels, list) and len(labels) == len(data)):
        raise prep_util.PrepError(f"{name}: 'labels' should be a list with one label per row of 'data'")
    if not all(isinstance(label, int) and 0 <= label < num_classes for label in labels):
        raise prep_util.PrepError(f"{name}: labels must be integers in [0, {num_classes})")
    return data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


def write_split(files, batch_names, names, folder):
    """Write the images of `batch_names` to `folder`, numbered in order; return the count."""
    os.makedirs(folder)
    index = 0
    for batch_name in batch_names:
        images, labels = load_batch(files, batch_name, len(names))
        for image, label in zip(images, labels):
            Image.fromarray(image).save(os.path.join(folder, f"{names[label]}_{index:05d}.png"))
            index += 1
    return index


def download_archive(dest, log=print):
    """Fetch the CIFAR-10 archive to `dest`, checking its MD5 before giving it that name."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    log(f"downloading {URL} to {dest}")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dest) + ".", suffix=".download", dir=folder)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != ARCHIVE_MD5:
            raise prep_util.PrepError(f"download of {URL} has MD5 {digest.hexdigest()}, expected {ARCHIVE_MD5}")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert_cifar10(source, out_dir, download=False, overwrite=False, log=print):
    """
    Write the CIFAR-10 train and test images under `out_dir`.

    :param source: the archive or folder; with `download`, a missing archive
        is fetched to this path first.
    :return: the marker dict of the finished folder.
    """

    def write(folder):
        if download and not os.path.exists(source):
            download_archive(source, log=log)
        files = read_source(source)
        names = label_names(files)
        counts = {
            split: write_split(files, batches, names, os.path.join(folder, split)) for split, batches in SPLITS.items()
        }
        log(", ".join(f"{split}: {count} images" for split, count in counts.items()))
        return sum(counts.values())

    settings = {"source": os.path.abspath(source)}
    return prep_util.build_folder(out_dir, settings, write, overwrite=overwrite, log=log)


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=f"{ARCHIVE} or the {FOLDER} folder")
    parser.add_argument("--out_dir", default="data/cifar10", help="folder to create (default: data/cifar10)")
    parser.add_argument(
        "--download", action="store_true", help=f"fetch the archive to SOURCE first if it is missing ({URL})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    convert_cifar10(args.source, args.out_dir, download=args.download, overwrite=args.overwrite)


if __name__ == "__main__":
    prep_util.run_cli(main)
