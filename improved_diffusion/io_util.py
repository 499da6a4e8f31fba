"""
Safe file writes and checked checkpoint reads.

Every file is written to a temporary name in the destination folder, flushed
to disk and renamed, so a crash never leaves a partial file under a final name.
Paths may be local or anything blobfile understands (blob stores commit an
object only when it is closed, which is atomic already). Checkpoints are
streamed into their file, never built whole in memory first.

Checkpoint files are torch pickles (read with weights_only=True) or, for a
path ending in `.safetensors`, safetensors files (a flat dict of tensors;
needs the optional `safetensors` package).
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


SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(InputError):
    """A file that should hold a checkpoint is missing, truncated or not one (or cannot be read or written here)."""


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
    with atomic_local_path(path) as tmp, open(tmp, "wb") as f:
        yield f


@contextlib.contextmanager
def atomic_local_path(path):
    """
    The path of a new, empty temporary file beside the local file `path`, for
    a writer that wants a file name: when the block ends without an error the
    file is synced and renamed to `path`; when it raises, the file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's owner-only 0600
            yield tmp
            os.fsync(fd)  # the file's data, whichever descriptor wrote it
        finally:
            os.close(fd)
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
    """
    torch.save `obj` to `path` atomically, streamed into the file (no copy of
    it in memory). A failed write raises its own OSError (such as "No space
    left on device"), not the RuntimeError about positions that torch's
    archive writer turns it into.
    """
    with atomic_open(path) as f:
        writer = _WriteErrorRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as exc:
            if writer.error is None:
                raise
            raise writer.error from exc


class _WriteErrorRecorder:
    """A binary file's write and flush that remember the first OSError a write raised."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        self.f.flush()


def is_safetensors_path(path):
    """Whether `path` names a safetensors file (by its suffix, as every reader here decides)."""
    return str(path).endswith(SAFETENSORS_SUFFIX)


def atomic_safetensors_save(state_dict, path):
    """
    Write a state dict of tensors to `path` as a safetensors file, atomically.

    Tensors that share storage with an earlier one (tied weights), and
    non-contiguous ones, are written as contiguous copies: the file holds the
    same keys and values as the dict, and loads strictly into the same model.
    A local file is written from the tensors' memory directly; a remote one
    (blobfile) is serialized in memory first.

    :raises CheckpointError: for a value that is not a tensor, or when the
        safetensors package is missing.
    """
    safetensors_torch = import_safetensors(f"writing {path}")
    tensors = _unshared_tensors(state_dict, path)
    metadata = {"format": "pt"}  # what the Hugging Face loaders expect of a PyTorch state dict
    path = str(path)
    if is_local(path):
        with atomic_local_path(path) as tmp:
            safetensors_torch.save_file(tensors, tmp, metadata=metadata)
    else:
        with atomic_open(path) as f:
            f.write(safetensors_torch.save(tensors, metadata=metadata))


def atomic_save_checkpoint(obj, path):
    """Write a checkpoint atomically: a safetensors file for a path ending in .safetensors, else torch.save."""
    if is_safetensors_path(path):
        atomic_safetensors_save(obj, path)
    else:
        atomic_torch_save(obj, path)


def _unshared_tensors(state_dict, path):
    """`state_dict` with every tensor contiguous, on the CPU, and no two sharing storage (as safetensors requires)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: a safetensors file holds a dict of tensors, not a {type(state_dict).__name__}")
    storages, out = set(), {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: a safetensors file holds only tensors, but {name!r} is a {type(value).__name__}; "
                f"save this state as a .pt file"
            )
        storage = (value.device, value.untyped_storage().data_ptr())
        shared = storage in storages and value.untyped_storage().nbytes() > 0
        storages.add(storage)
        value = value.detach().cpu()
        out[name] = value.clone(memory_format=torch.contiguous_format) if shared else value.contiguous()
    return out


def import_safetensors(purpose):
    """
    The safetensors.torch module.

    :param purpose: what needs it, for the error ("reading x.safetensors").
    :raises CheckpointError: saying how to install the package, if it is missing.
    """
    try:
        import safetensors.torch
    except ImportError as exc:
        raise CheckpointError(
            f"{purpose} needs the safetensors package: pip install safetensors "
            f"(or the extra: pip install 'improved-diffusion[safetensors]')"
        ) from exc
    return safetensors.torch


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
    Unpickle checkpoint bytes with weights_only=True, or, when `path` ends in
    .safetensors, read them as a safetensors file (a dict of tensors).

    :param path: the file the bytes came from, named in errors; its suffix
        picks the format.
    :param map_location: as torch.load's; for safetensors a device (or its name).
    :raises CheckpointError: for a truncated file, a file that is not a torch
        checkpoint (or not a safetensors file), or one that holds objects other
        than tensors and plain data.
    """
    if is_safetensors_path(path):
        return _load_safetensors_bytes(data, path, map_location)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for bad archives
        raise CheckpointError(
            f"cannot load {path} as a checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            f"the file is truncated, corrupt, or not a plain state dict "
            f"(only tensors and plain Python data are accepted)"
        ) from exc


def _load_safetensors_bytes(data, path, map_location):
    safetensors_torch = import_safetensors(f"reading {path}")
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location for a safetensors file is a device or its name, got {map_location!r}")
    try:
        state_dict = safetensors_torch.load(data)
    except Exception as exc:  # the package raises its own SafetensorError, and others for bad headers
        raise CheckpointError(
            f"cannot load {path} as a safetensors file ({type(exc).__name__}: {_first_line(exc)}); "
            f"the file is truncated, corrupt, or not in the safetensors format"
        ) from exc
    device = torch.device(map_location)
    return {name: tensor.to(device) for name, tensor in state_dict.items()}


def load_checkpoint(path, map_location="cpu"):
    """Read and load one checkpoint file, a torch pickle or a .safetensors file (see load_checkpoint_bytes)."""
    return load_checkpoint_bytes(read_bytes(path), path, map_location=map_location)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
