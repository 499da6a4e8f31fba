"""
Forward+backward speed and memory of the CIFAR-10 UNet (the published configuration).

    python benchmarks/bench_unet.py [--device cpu|cuda] [--iters 3] [--batch 8] [--compile]

Prints a markdown table: seconds per training iteration (forward, mean loss,
backward) in float32 and under autocast, and peak memory of one iteration
with and without gradient checkpointing.

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
import multiprocessing
import os
import statistics
import time

import torch

from improved_diffusion.script_util import create_model

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


def seconds_per_iter(model, x, t, dtype, iters, warmup):
    """Median wall time of `iters` training steps after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        _sync(x.device)
        start = time.perf_counter()
        train_step(model, x, t, dtype)
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    parser.add_argument("--skip_memory", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    x, t = batch(device, args.batch)
    rows = []
    for use_checkpoint in (False, True):
        model = build(device, use_checkpoint, args.compile)
        for dtype in dtypes:
            sec = seconds_per_iter(model, x, t, dtype, args.iters, args.warmup)
            name = "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} autocast"
            rows.append((name, use_checkpoint, f"{sec:.3f} s"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), batch {args.batch}, torch {torch.__version__}\n")
    print("| precision | checkpointing | seconds / iteration |")
    print("| --- | --- | --- |")
    for name, ckpt, sec in rows:
        print(f"| {name} | {'yes' if ckpt else 'no'} | {sec} |")
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
