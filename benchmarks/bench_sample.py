"""
Time DDIM sampling with the small preset: a 32x32 UNet (64 channels, 2
residual blocks per level, attention at 16x16 and 8x8 with 4 heads, learned
sigmas) over the cosine schedule of 4000 steps respaced to ddim50, one batch.

    python benchmarks/bench_sample.py                          # float32 and bf16 autocast, CPU
    python benchmarks/bench_sample.py --precisions float32 --threads 2
    python benchmarks/bench_sample.py --device cuda --precisions float32,fp16,bf16 --compile

bf16 is image_sample.py --use_bf16 True (bfloat16 autocast around the model),
fp16 is --use_fp16 True (float16 convolutions, CUDA). Weights are random (the
zero-initialized layers too, so no path is trivially zero). The precisions
are timed in turns, one whole sampling loop each, after --warmup untimed
loops each (default 1), so a machine shared with other jobs slows them
alike. Prints a Markdown table: median and best wall time, the median CPU
time of the process (all threads), the model's arithmetic per CPU second,
and the median wall time over --reference_s. On a machine shared with other jobs the wall
time measures the contention; with --threads 1 the CPU time is disturbed far
less and GFLOP per CPU second is the per-core throughput.
"""

import argparse
import os
import statistics
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from improved_diffusion.model_loading import AutocastModel
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

from presets import SMALL_PRESET  # benchmarks/ is on sys.path when run as a script

PRESET = {**SMALL_PRESET, "timestep_respacing": "ddim50"}


def build(device, precision, compile_model):
    """The preset model (random weights, eval mode, on `device`) in `precision`, and its diffusion."""
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **PRESET})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.to(device).eval()
    if precision == "fp16":
        model.convert_to_fp16()
    if precision == "bf16":
        model = AutocastModel(model)
    if compile_model:
        model = torch.compile(model)
    return model, diffusion


def time_sampling(model, diffusion, batch_size, device):
    """(wall seconds, process CPU seconds) of one ddim_sample_loop over a [batch_size x 3 x 32 x 32] batch."""
    shape = (batch_size, 3, PRESET["image_size"], PRESET["image_size"])
    generator = torch.Generator(device=device).manual_seed(0)
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        diffusion.ddim_sample_loop(model, shape, device=device, generator=generator, eta=0.0)
    _synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def loop_gflop(model, diffusion, batch_size, device):
    """Floating-point operations of the model calls in one sampling loop, in GFLOP (torch's flop counter)."""
    x = torch.zeros(batch_size, 3, PRESET["image_size"], PRESET["image_size"], device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops() * diffusion.num_timesteps / 1e9


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name():
    """The CPU model name from lscpu, or "unknown"."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")]
    return names[0] if names else "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed loops of each precision first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precisions", default="float32,bf16", help="comma-separated: float32, bf16, fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--reference_s", type=float, default=7.0, help="reference wall time to compare with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    models = {p: build(args.device, p, args.compile) for p in precisions}
    times = {p: [] for p in precisions}
    for repeat in range(args.warmup + args.repeats):
        for precision, (model, diffusion) in models.items():
            measured = time_sampling(model, diffusion, args.batch_size, args.device)
            if repeat >= args.warmup:
                times[precision].append(measured)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    gflop = loop_gflop(*models[precisions[0]], args.batch_size, args.device)
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, {gflop:.0f} GFLOP per loop")
    print("| device | precision | compile | batch | median s | best s | median CPU s | GFLOP per CPU s | median / reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, measured in times.items():
        walls = [wall for wall, _ in measured]
        median, cpu = statistics.median(walls), statistics.median(cpu for _, cpu in measured)
        print(
            f"| {args.device} | {precision} | {'yes' if args.compile else 'no'} | {args.batch_size} | {median:.2f} "
            f"| {min(walls):.2f} | {cpu:.2f} | {gflop / cpu:.0f} | {median / args.reference_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
