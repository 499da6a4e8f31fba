"""
Safe file writes and checked checkpoint reads.

Every file is written to a temporary name in the destination folder, flushed
to disk and renamed, so a crash never leaves a partial file under a final name.
Paths may be local or anything blobfile understands (blob stores commit an
object only when it is closed, which is atomic already).
"""

import contextlib
import io
import json
import os
import shutil
import tempfile

import blobfile as bf
import torch

from .errors import InputError


class CheckpointError(InputError):
    """A file that should hold a checkpoint is missing, truncated or not one."""


def _read_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it to read it is not thread-safe


def is_local(path):
    """Whether `path` is on the local filesystem (not a blobfile URL such as gs://...)."""
    return "://" not in str(path)


@contextlib.contextmanager
def atomic_open(path):
    """
    A binary file to write `path` through: a temporary file in the same
    folder, flushed, synced and renamed to `path` when the block ends without
    an error, removed when it raises.
    """
    path = str(path)
    if not is_local(path):
        with bf.BlobFile(path, "wb") as f:
            yield f
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_folder(path):
    """
    A folder to fill in place of `path`. A local one is filled under a hidden
    name beside it, synced once (not file by file) and renamed to `path`,
    replacing an earlier folder of that name; it is removed if the block
    raises. A remote one is filled in place (each object is written whole).
    """
    path = str(path)
    if not is_local(path):
        yield path
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # what mkdir would give, not mkdtemp's owner-only 0700
        yield tmp
        os.sync()
        if os.path.isdir(path):
            os.replace(path, tmp + ".old")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp + ".old", ignore_errors=True)
    _fsync_dir(parent)


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` through a temporary file and a rename."""
    with atomic_open(path) as f:
        f.write(data)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path):
    """torch.save `obj` to `path` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_bytes(path):
    """Read a whole local or blobfile path; CheckpointError if it is missing."""
    path = str(path)
    if not bf.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    with bf.BlobFile(path, "rb") as f:
        return f.read()


def load_checkpoint_bytes(data, path, map_location="cpu"):
    """
    Unpickle checkpoint bytes with weights_only=True.

    :param path: the file the bytes came from, named in errors.
    :raises CheckpointError: for a truncated file, a file that is not a torch
        checkpoint, or one that holds objects other than tensors and plain data.
    """
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for bad archives
        raise CheckpointError(
            f"cannot load {path} as a checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            f"the file is truncated, corrupt, or not a plain state dict "
            f"(only tensors and plain Python data are accepted)"
        ) from exc


def load_checkpoint(path, map_location="cpu"):
    """Read and unpickle one checkpoint file (see load_checkpoint_bytes)."""
    return load_checkpoint_bytes(read_bytes(path), path, map_location=map_location)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
