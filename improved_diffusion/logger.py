"""
Key-value and text logging for training runs.

During a step, code records scalars with `logkv` (last value wins) or
`logkv_mean` (averaged until the next dump); `dumpkvs` then writes them all at
once to every output of the current logger and starts afresh. `log` writes a
line of text. The outputs are chosen by name:

- "stdout": a table (and text lines) on standard output;
- "log": the same, appended to `log.txt` in the log directory;
- "csv": one row per dump appended to `progress.csv` (when a key appears
  later, the header is rewritten and earlier rows get empty cells);
- "json": one JSON object per dump appended to `progress.json`;
- "tensorboard": every numeric value as a TensorBoard scalar at the dump's
  "step" value, in event files under `tb/` (needs the `tensorboard`
  package, extra `[tensorboard]`).

`configure` picks the directory (`OPENAI_LOGDIR`, else a new temporary
folder) and the outputs (`OPENAI_LOG_FORMAT`, default "stdout,log,csv"). In a
multi-process run only rank 0 writes by default; other ranks write only the
outputs named in `OPENAI_LOG_FORMAT_MPI` or passed explicitly, to files with a
`-rank001`-style suffix. Changes from the reference: files are appended to,
not truncated, so a run resumed in the same folder keeps its history; all
ranks agree on the temporary folder; values may be 0-d tensors, which are
read back from the device only when dumped.
"""

import atexit
import contextlib
import csv
import datetime
import io
import json
import os
import sys
import tempfile
import time

import torch

from . import dist_util
from .io_util import atomic_write_bytes

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

DEFAULT_FORMATS = "stdout,log,csv"
_MAX_CELL = 30


class KVWriter:
    """An output format that writes key-value tables (the reference's base class)."""

    def writekvs(self, kvs):
        raise NotImplementedError


class SeqWriter:
    """An output format that writes lines of text (the reference's base class)."""

    def writeseq(self, seq):
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """Writes key-value tables and text lines to a stream or an appended file."""

    def __init__(self, file_or_path):
        if isinstance(file_or_path, str):
            self.file = open(file_or_path, "at", encoding="utf-8")
            self.owns_file = True
        else:
            self.file = file_or_path
            self.owns_file = False

    def writekvs(self, kvs):
        if not kvs:
            return
        self.file.write(_format_table(kvs) + "\n")
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(a) for a in seq) + "\n")
        self.file.flush()

    def close(self):
        if self.owns_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """Appends one JSON object per dump to a file."""

    def __init__(self, path):
        self.file = open(path, "at", encoding="utf-8")

    def writekvs(self, kvs):
        self.file.write(json.dumps(kvs, default=str) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """
    Appends one row per dump to a CSV file whose header is the union of all
    keys seen so far (existing rows are kept when the file already exists).
    """

    def __init__(self, path):
        self.path = path
        self.keys = _read_csv_header(path)
        self.file = open(path, "at", encoding="utf-8", newline="")

    def writekvs(self, kvs):
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._rewrite_with_keys(self.keys + new_keys)
        csv.writer(self.file).writerow([_csv_cell(kvs.get(k)) for k in self.keys])
        self.file.flush()

    def _rewrite_with_keys(self, keys):
        self.file.close()
        with open(self.path, "rt", encoding="utf-8", newline="") as f:
            old_rows = list(csv.reader(f))[1:]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(keys)
        for row in old_rows:
            writer.writerow(row + [""] * (len(keys) - len(row)))
        atomic_write_bytes(self.path, buffer.getvalue().encode("utf-8"))
        self.keys = keys
        self.file = open(self.path, "at", encoding="utf-8", newline="")

    def close(self):
        self.file.close()


class TensorBoardOutputFormat(KVWriter):
    """
    Writes every numeric value of a dump as a scalar through
    torch.utils.tensorboard, at the dump's "step" value (the number of dumps
    so far when it has none), and images with `write_image`.
    """

    def __init__(self, path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the tensorboard log format needs the tensorboard package: pip install tensorboard "
                "(or pip install -e .[tensorboard]), or drop tensorboard from OPENAI_LOG_FORMAT"
            ) from exc
        self.writer = SummaryWriter(log_dir=path)
        self.dumps = 0

    def writekvs(self, kvs):
        self.dumps += 1
        step = int(kvs.get("step", self.dumps))
        for key, value in kvs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def write_image(self, tag, image, step):
        """Add uint8 [H x W x 3] `image` under `tag` at `step`."""
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


def _read_csv_header(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, "rt", encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def _csv_cell(value):
    return "" if value is None else value


def _format_table(kvs):
    """A two-column table of keys and values, sorted by key, cells cut to 30 chars."""
    rows = [(_truncate(str(k)), _truncate(_format_value(v))) for k, v in kvs.items()]
    rows.sort(key=lambda row: row[0].lower())
    key_width = max(len(k) for k, _ in rows)
    val_width = max(len(v) for _, v in rows)
    rule = "-" * (key_width + val_width + 7)
    lines = [f"| {k:<{key_width}} | {v:<{val_width}} |" for k, v in rows]
    return "\n".join([rule, *lines, rule])


def _format_value(value):
    return f"{value:<8.3g}" if isinstance(value, float) else str(value)


def _truncate(text):
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


def make_output_format(format, ev_dir, log_suffix=""):
    """The output named `format` ("stdout", "log", "csv", "json" or "tensorboard") writing in `ev_dir`."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"unknown log format {format!r}; known formats: stdout, log, csv, json, tensorboard")


def _to_python(value):
    """A tensor or NumPy scalar as a plain Python number; anything else unchanged."""
    return value.item() if hasattr(value, "item") else value


class Logger:
    """
    Collects key-value pairs between dumps and writes them, and text, to
    `output_formats`. With an MPI communicator `comm`, `dumpkvs` averages the
    values over its ranks (weighted by how many values each averaged) and
    only its rank 0 writes.
    """

    CURRENT = None

    def __init__(self, dir, output_formats, comm=None):
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm
        self.level = INFO
        self.values = {}
        self.sums = {}
        self.counts = {}

    def logkv(self, key, val):
        self.sums.pop(key, None)
        self.counts.pop(key, None)
        self.values[key] = _detach(val)

    def logkv_mean(self, key, val, count=1):
        """
        Add `val` (a number or a one-element tensor, left on its device) to the
        key's mean. With `count` (a number or a one-element tensor), `val` is
        the sum of that many values; a key whose counts add up to 0 by the dump
        is left out of it.
        """
        self.values.pop(key, None)
        self.sums[key] = self.sums.get(key, 0.0) + _summable(key, val)
        self.counts[key] = self.counts.get(key, 0) + _summable(key, count)

    def getkvs(self):
        """The values a dump would write now, as plain Python numbers (clears nothing)."""
        return {k: v for k, (v, _) in self._values_and_counts().items()}

    def _values_and_counts(self):
        """{key: (plain value, how many values it averages)}; reads tensors back once."""
        pairs = {k: (_to_python(v), 1) for k, v in self.values.items()}
        for key, total in self.sums.items():
            count = _to_python(self.counts[key])
            if count:
                pairs[key] = (_to_python(total) / count, count)
        return pairs

    def dumpkvs(self):
        """Write the collected values to every output, clear them and return them as a dict."""
        kvs = self.getkvs() if self.comm is None else self._gather_over_comm()
        if self.comm is None or self.comm.Get_rank() == 0:
            for fmt in self.output_formats:
                if hasattr(fmt, "writekvs"):
                    fmt.writekvs(kvs)
        self.values.clear()
        self.sums.clear()
        self.counts.clear()
        return kvs

    def _gather_over_comm(self):
        gathered = self.comm.gather(self._values_and_counts(), root=0)
        if self.comm.Get_rank() != 0:
            return {}
        return _weighted_means(gathered)

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if hasattr(fmt, "writeseq"):
                    fmt.writeseq(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


def _detach(val):
    """A tensor cut from autograd; anything else unchanged."""
    return val.detach() if isinstance(val, torch.Tensor) else val


def _summable(key, val):
    """`val` ready to add to a running sum: a one-element tensor becomes at least float32."""
    if not isinstance(val, torch.Tensor):
        return val
    if val.numel() != 1:
        raise ValueError(f"logkv_mean({key!r}) needs one number, got a tensor of shape {tuple(val.shape)}")
    val = val.detach()
    return val if val.is_floating_point() and val.element_size() >= 4 else val.float()


def _weighted_means(per_rank):
    """Merge per-rank {key: (value, count)} dicts into {key: count-weighted mean}."""
    totals = {}
    for kvs in per_rank:
        for key, (value, count) in kvs.items():
            if not isinstance(value, (int, float)):
                totals.setdefault(key, (value, 0))
                continue
            total, weight = totals.get(key, (0.0, 0))
            totals[key] = (total + value * count, weight + count)
    return {k: (v / w if w else v) for k, (v, w) in totals.items()}


def mpi_weighted_mean(comm, local_name2valcount):
    """
    The reference's helper: {name: (value, count)} from every rank of the MPI
    communicator `comm`, merged on rank 0 into {name: count-weighted mean}; {} elsewhere.
    """
    all_name2valcount = comm.gather(local_name2valcount)
    return _weighted_means(all_name2valcount) if comm.rank == 0 else {}


def get_rank_without_mpi_import():
    """This process's rank from the launcher's environment (MPI or torchrun), 0 without one."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def get_current():
    """The logger in use, configured with defaults on first use."""
    if Logger.CURRENT is None:
        configure()
    return Logger.CURRENT


def logkv(key, val):
    """Record `val` under `key` for the next dump (a later call overwrites it)."""
    get_current().logkv(key, val)


def logkv_mean(key, val, count=1):
    """
    Average `val` into `key` until the next dump (0-d tensors stay on device
    until then); with `count`, `val` is the sum of `count` values (Logger.logkv_mean).
    """
    get_current().logkv_mean(key, val, count)


def logkvs(d):
    """logkv for each item of the dict `d`."""
    for key, val in d.items():
        logkv(key, val)


def dumpkvs():
    """Write the values recorded since the last dump and return them as a dict of Python numbers."""
    return get_current().dumpkvs()


def getkvs():
    """The values recorded since the last dump, without writing or clearing them."""
    return get_current().getkvs()


def log(*args, level=INFO):
    """Write the arguments, joined by spaces, as one line to every text output."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Write only text logged at `level` (DEBUG, INFO, WARN, ERROR, DISABLED) or above."""
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The log directory, where checkpoints and logs of this run go."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(name):
    """Time the enclosed block and add the seconds to the mean of key "wait_<name>"."""
    start = time.time()
    try:
        yield
    finally:
        logkv_mean("wait_" + name, time.time() - start)


class _Profile(contextlib.ContextDecorator):
    """profile(name): profile_kv as a reusable decorator or context manager."""

    def __init__(self, name):
        self.name = name
        self.starts = []

    def __enter__(self):
        self.starts.append(time.time())
        return self

    def __exit__(self, *exc_info):
        logkv_mean("wait_" + self.name, time.time() - self.starts.pop())
        return False


def profile(name):
    """
    Time each call of the decorated function (`@logger.profile("step")`), or
    each `with` block, into the mean of key "wait_<name>", as profile_kv does.
    """
    return _Profile(name)


def log_image(tag, image, step):
    """Write uint8 [H x W x 3] `image` to the current logger's tensorboard outputs (if any) at `step`."""
    for fmt in get_current().output_formats:
        if hasattr(fmt, "write_image"):
            fmt.write_image(tag, image, step)


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """
    Start a new current logger (closing the previous one).

    :param dir: the log directory; default `OPENAI_LOGDIR`, else a new folder
        `openai-YYYY-MM-DD-HH-MM-SS-ffffff` under the system temp dir (the
        same one on every rank when torch.distributed is initialized; call
        this on every rank then).
    :param format_strs: output names, a list or a comma-separated string;
        default `OPENAI_LOG_FORMAT` ("stdout,log,csv") on rank 0 and
        `OPENAI_LOG_FORMAT_MPI` (nothing) on other ranks.
    :param comm: an MPI communicator whose ranks' values are averaged by dumpkvs.
    """
    rank = comm.Get_rank() if comm is not None else dist_util.get_rank()
    dir = os.path.expanduser(_choose_dir(dir))
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        env_name = "OPENAI_LOG_FORMAT" if rank == 0 else "OPENAI_LOG_FORMAT_MPI"
        format_strs = os.getenv(env_name, DEFAULT_FORMATS if rank == 0 else "")
    if isinstance(format_strs, str):
        format_strs = format_strs.split(",")
    os.makedirs(dir, exist_ok=True)
    formats = [make_output_format(f.strip(), dir, log_suffix) for f in format_strs if f.strip()]
    reset()
    Logger.CURRENT = Logger(dir=dir, output_formats=formats, comm=comm)
    atexit.unregister(reset)
    atexit.register(reset)  # close the log files at exit, once
    if formats:
        log(f"Logging to {dir}")


def _choose_dir(dir):
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = dist_util.broadcast_object(os.path.join(tempfile.gettempdir(), stamp))
    return dir


def reset():
    """Close the current logger; the next call configures a default one."""
    if Logger.CURRENT is not None:
        Logger.CURRENT.close()
        Logger.CURRENT = None


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Use a logger configured with these arguments inside the block, then restore the previous one."""
    previous = Logger.CURRENT
    Logger.CURRENT = None
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous
