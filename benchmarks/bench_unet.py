"""
Forward+backward speed and memory of the CIFAR-10 UNet (the published configuration).

    python benchmarks/bench_unet.py [--device cpu|cuda] [--iters 3] [--batch 8] [--threads N] [--compile]
                                    [--precisions float32,bfloat16,float16]

Prints markdown tables: seconds per training iteration (forward, mean loss,
backward; wall clock and the process's CPU time) in float32 and under
autocast, with and without gradient checkpointing, next to a baseline with
the reference's formulation of the changed layers (see reference_formulation);
then the memory of one iteration with and without gradient checkpointing.

Memory is measured in a fresh process per setting, after one warm-up step,
as two numbers relative to the memory in use before the forward pass: what
the autograd graph holds once the forward pass is done (the activations),
and the peak over forward and backward (which adds the parameter gradients
and the backward pass's temporaries). On CUDA these come from
torch.cuda.memory_allocated() and max_memory_allocated(); on CPU from the
process's resident set size (VmRSS) and its peak (VmHWM, reset through
/proc/self/clear_refs), with glibc told to map every allocation of 64 KiB
or more on its own (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the
resident set at once.
"""

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time

import torch

from improved_diffusion.nn import Dropout, GroupNorm32
from improved_diffusion.script_util import create_model
from improved_diffusion.unet import AttentionBlock

CIFAR10_FLAGS = {
    "image_size": 32,
    "num_channels": 128,
    "num_res_blocks": 3,
    "learn_sigma": True,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "16,8",
    "num_heads": 4,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "dropout": 0.3,
}


def build(device, use_checkpoint=False, compile_model=False):
    """The CIFAR-10 model in training mode on `device` (optionally torch.compile'd)."""
    model = create_model(**dict(CIFAR10_FLAGS, use_checkpoint=use_checkpoint)).to(device).train()
    return torch.compile(model) if compile_model else model


def batch(device, size):
    """Images [N x 3 x 32 x 32] and timesteps [N] from a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (size,), generator=gen)
    return x.to(device), t.to(device)


def train_step(model, x, t, dtype):
    """One forward (under autocast to `dtype`, unless float32) and backward pass."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, t).float().square().mean()
    loss.backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def reference_formulation():
    """
    Swap in the reference's formulation of the layers this implementation
    changed, for a baseline measured under the same conditions: attention as
    two einsums around a float32 softmax over [N*heads x 3d x T] channels,
    dropout through bernoulli_ (nn.Dropout), and GroupNorm through float32
    copies of 16-bit inputs.
    """
    saved = AttentionBlock._forward, Dropout.forward, GroupNorm32._mixed_kernel
    AttentionBlock._forward = _einsum_attention
    Dropout.forward = torch.nn.Dropout.forward
    GroupNorm32._mixed_kernel = lambda self, x: False
    try:
        yield
    finally:
        AttentionBlock._forward, Dropout.forward, GroupNorm32._mixed_kernel = saved


def _einsum_attention(self, x):
    """AttentionBlock._forward as the reference computes it: [N x C x ...] -> [N x C x ...]."""
    n, c, *spatial = x.shape
    x = x.reshape(n, c, -1)
    qkv = self.qkv(self.norm(x)).reshape(n * self.num_heads, -1, x.shape[-1])
    q, k, v = qkv.chunk(3, dim=1)
    scale = (c // self.num_heads) ** -0.25
    weights = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weights = weights.float().softmax(dim=-1).type(weights.dtype)
    h = torch.einsum("bts,bcs->bct", weights, v).reshape(n, c, -1)
    return (x + self.proj_out(h)).reshape(n, c, *spatial)


def time_settings(settings, x, t, iters, warmup):
    """
    Median (wall, CPU) seconds of a training step per setting. Settings take
    turns step by step, so that a change in the machine's load hits them alike.
    """
    times = {name: [] for name in settings}
    for i in range(warmup + iters):
        for name, (model, dtype, formulation) in settings.items():
            with formulation():
                _sync(x.device)
                wall, cpu = time.perf_counter(), time.process_time()
                train_step(model, x, t, dtype)
                _sync(x.device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if i >= warmup:
                times[name].append((wall, cpu))
    return {name: tuple(statistics.median(col) for col in zip(*runs)) for name, runs in times.items()}


def _resident_bytes(field):
    """A memory field of this process ("VmRSS" now, "VmHWM" peak since the last reset), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_resident():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _memory_counters(device):
    """Functions giving the bytes in use on `device` now and their peak since this call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return (lambda: torch.cuda.memory_allocated(device)), (lambda: torch.cuda.max_memory_allocated(device))
    _reset_peak_resident()
    return (lambda: _resident_bytes("VmRSS")), (lambda: _resident_bytes("VmHWM"))


def _memory_probe(device_name, use_checkpoint, batch_size, queue):
    """
    Run in a fresh process: after one warm-up step, report (bytes held after
    the forward pass, peak bytes over forward and backward), both relative to
    the memory in use before the forward pass.
    """
    device = torch.device(device_name)
    model = build(device, use_checkpoint)
    x, t = batch(device, batch_size)
    train_step(model, x, t, torch.float32)
    model.zero_grad(set_to_none=True)
    _sync(device)
    now, peak = _memory_counters(device)
    before = now()
    loss = model(x, t).square().mean()
    _sync(device)
    held = now() - before
    loss.backward()
    _sync(device)
    queue.put((held, peak() - before))


def memory_use(device, use_checkpoint, batch_size):
    """(held after forward, peak) in bytes, measured in a spawned process (see _memory_probe)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_probe, args=(str(device), use_checkpoint, batch_size, queue))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--precisions", default="", help="comma-separated of float32, bfloat16, float16 "
                        "(default: float32 and bfloat16, and float16 on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    if args.precisions:
        names = args.precisions.split(",")
        unknown = [n for n in names if n not in ("float32", "bfloat16", "float16")]
        if unknown:
            parser.error(f"unknown --precisions {','.join(unknown)}: use float32, bfloat16 or float16")
        dtypes = [getattr(torch, n) for n in names]
    plain, ckpt = build(device, False, args.compile), build(device, True, args.compile)
    settings = {}
    for dtype in dtypes:
        precision = "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} autocast"
        settings[(precision, "this implementation", "no")] = (plain, dtype, contextlib.nullcontext)
        if not args.compile:
            settings[(precision, "reference formulation", "no")] = (plain, dtype, reference_formulation)
        settings[(precision, "this implementation", "yes")] = (ckpt, dtype, contextlib.nullcontext)
    x, t = batch(device, args.batch)
    results = time_settings(settings, x, t, args.iters, args.warmup)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), batch {args.batch}, torch {torch.__version__}, median of {args.iters}\n")
    print("| precision | layers | checkpointing | seconds / iteration | CPU seconds / iteration |")
    print("| --- | --- | --- | --- | --- |")
    for (precision, layers, checkpointing), (wall, cpu) in results.items():
        print(f"| {precision} | {layers} | {checkpointing} | {wall:.3f} | {cpu:.3f} |")
    if args.skip_memory:
        return
    print("\n| float32, one iteration | no checkpointing | checkpointing | saved |")
    print("| --- | --- | --- | --- |")
    plain, ckpt = (memory_use(device, c, args.batch) for c in (False, True))
    labels = ("held by the graph after forward", "peak over forward + backward")
    for label, without, with_ in zip(labels, plain, ckpt):
        print(f"| {label} | {without / 2**20:.0f} MiB | {with_ / 2**20:.0f} MiB | {1 - with_ / without:.0%} |")


if __name__ == "__main__":
    main()
