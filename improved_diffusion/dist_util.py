"""
Process groups, devices and rank-0 file loading for one or many processes.

`setup_dist()` works the same however the processes were started:

- `mpiexec -n K python ...` (needs mpi4py): each MPI process is one rank;
  rank 0 picks the rendezvous address and a free port and sends them to the
  others over MPI;
- `torchrun --nproc_per_node K ...`: the ranks and rendezvous address come
  from the environment that torchrun sets;
- a plain `python ...`: a single rank, with or without mpi4py installed.

It always creates a torch.distributed process group, of size 1 too, so DDP
and the collectives below behave alike everywhere: NCCL with one GPU per
local rank when CUDA is available, gloo on CPU. mpi4py is imported only when
the environment shows an MPI launch.
"""

import os
import socket

import torch
import torch.distributed as dist

from .io_util import CheckpointError, load_checkpoint, load_checkpoint_bytes, read_bytes

# Variables that MPICH/Hydra, Open MPI and PMIx launchers set in each process.
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_BROADCAST_CHUNK_BYTES = 64 * 1024 * 1024

# The reference's cluster layout: a rank whose launcher gives no LOCAL_RANK
# takes the GPU rank % GPUS_PER_NODE. Change it to match your nodes.
GPUS_PER_NODE = 8
# The reference's setup retry count, kept for code that imports it; nothing here retries.
SETUP_RETRY_COUNT = 3


def setup_dist(backend=None):
    """
    Create the default process group for this launch; a no-op when one exists.

    :param backend: "nccl" or "gloo"; default NCCL when CUDA is available, else gloo.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    launched_by_mpi = _launched_by_mpi()
    if launched_by_mpi:
        _export_rendezvous_from_mpi()
    if backend == "nccl":
        _select_gpu(_local_rank())
    if launched_by_mpi or "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _launched_by_mpi():
    return "WORLD_SIZE" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS)


def _export_rendezvous_from_mpi():
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from MPI.COMM_WORLD."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            "this process was started by an MPI launcher but mpi4py is not installed; "
            "install it (pip install mpi4py) or launch with torchrun instead"
        ) from exc
    comm = MPI.COMM_WORLD
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = node_comm.Get_size() == comm.Get_size()
    address = comm.bcast(_rendezvous_address(one_node) if comm.Get_rank() == 0 else None, root=0)
    os.environ.update(
        RANK=str(comm.Get_rank()),
        WORLD_SIZE=str(comm.Get_size()),
        LOCAL_RANK=str(node_comm.Get_rank()),
        LOCAL_WORLD_SIZE=str(node_comm.Get_size()),
        MASTER_ADDR=address[0],
        MASTER_PORT=str(address[1]),
    )
    node_comm.Free()


def _rendezvous_address(one_node):
    """(host, port) where rank 0 will listen; MASTER_ADDR / MASTER_PORT win when set."""
    default_host = "127.0.0.1" if one_node else socket.gethostbyname(socket.getfqdn())
    host = os.environ.get("MASTER_ADDR", default_host)
    port = int(os.environ.get("MASTER_PORT", 0)) or find_free_port()
    return host, port


def _select_gpu(local_rank):
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this node has {count}; "
            f"start at most {count} processes per node"
        )
    torch.cuda.set_device(local_rank)


def _local_rank():
    """LOCAL_RANK from the launcher; without it, RANK % GPUS_PER_NODE (0 when neither is set)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return int(os.environ.get("RANK", 0)) % GPUS_PER_NODE


def find_free_port():
    """A TCP port that was free on this host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_initialized():
    """Whether a default torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def dev():
    """The device for this rank: cuda:<local rank> when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank())
    return torch.device("cpu")


def get_rank():
    """This process's rank; before setup_dist, the rank its launcher assigned (0 if none)."""
    if is_initialized():
        return dist.get_rank()
    return _first_env_int(("RANK",) + _MPI_RANK_VARS, 0)


def get_world_size():
    """The number of ranks; before setup_dist, the launcher's count (1 if none)."""
    if is_initialized():
        return dist.get_world_size()
    return _first_env_int(("WORLD_SIZE",) + _MPI_SIZE_VARS, 1)


def _first_env_int(names, default):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def is_main_process():
    return get_rank() == 0


def _is_multi_process():
    return is_initialized() and dist.get_world_size() > 1


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if _is_multi_process():
        dist.barrier()


def _comm_device():
    """Where collective tensors must live for the backend in use."""
    return dev() if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` (any picklable object) on every rank."""
    if not _is_multi_process():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def all_gather_object(obj):
    """The list of every rank's `obj`, in rank order, on every rank."""
    if not _is_multi_process():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(tensor):
    """Replace `tensor` in place by its mean over ranks, and return it."""
    if _is_multi_process():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def sync_params(params):
    """Copy rank 0's values of the tensors in `params` to every rank, in place."""
    if not _is_multi_process():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def load_state_dict(path, **kwargs):
    """
    Load a checkpoint (`torch.load` with weights_only=True, or a safetensors
    file when `path` ends in .safetensors) that only rank 0 reads from disk.

    Rank 0 reads the file's bytes once and broadcasts them; every rank
    loads them. If rank 0 cannot read the file, every rank raises the
    same CheckpointError naming it.

    :param kwargs: `map_location` (default "cpu"; for safetensors a device or its name).
    """
    map_location = kwargs.pop("map_location", "cpu")
    if kwargs:
        raise TypeError(f"load_state_dict() got unexpected keyword arguments {sorted(kwargs)}")
    if not _is_multi_process():
        return load_checkpoint(path, map_location=map_location)
    return load_checkpoint_bytes(_read_on_rank0(path), path, map_location=map_location)


def _read_on_rank0(path):
    """The bytes of `path` as read by rank 0, on every rank (CheckpointError everywhere on failure)."""
    ok, payload = True, b""
    if dist.get_rank() == 0:
        try:
            payload = read_bytes(path)
        except Exception as exc:
            ok, payload = False, _read_error_text(path, exc).encode("utf-8")
    header = torch.tensor([int(ok), len(payload)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(header, 0)
    data = _broadcast_bytes(payload, int(header[1]))
    if not header[0]:
        raise CheckpointError(data.decode("utf-8"))
    return data


def _read_error_text(path, exc):
    return str(exc) if isinstance(exc, CheckpointError) else f"cannot read checkpoint {path}: {exc}"


def _broadcast_bytes(payload, nbytes):
    """Rank 0's `payload` (bytes of length `nbytes`) on every rank, sent in chunks."""
    is_source = dist.get_rank() == 0
    if is_source and nbytes:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    device = _comm_device()
    for start in range(0, nbytes, _BROADCAST_CHUNK_BYTES):
        chunk = buffer[start : start + _BROADCAST_CHUNK_BYTES]
        staged = chunk.to(device)
        dist.broadcast(staged, 0)
        chunk.copy_(staged)
    return payload if is_source else bytes(buffer.numpy())


def cleanup_dist():
    """Destroy the default process group, if any (setup_dist can then run again)."""
    if is_initialized():
        dist.destroy_process_group()
