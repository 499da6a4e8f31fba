"""
Seconds per training step (TrainLoop.run_step) on the small preset:
32x32 images, 64 channels, 2 residual blocks, learned sigmas, cosine schedule
of 4000 steps, attention at 16x16 and 8x8 with 4 heads, batch 8.

    python benchmarks/bench_train.py [--device cpu|cuda] [--modes fp32,bf16]
                                     [--steps 10] [--warmup 3] [--threads 0]

Prints one markdown table row per mode: the median, minimum and maximum of
`--steps` timed steps after `--warmup` untimed ones. Data are random images
held in memory, so the numbers measure the model, losses, optimizer and EMA.
"""

import argparse
import statistics
import tempfile
import time

import torch

from improved_diffusion import logger, script_util
from improved_diffusion.train_util import TrainLoop

from presets import SMALL_PRESET  # benchmarks/ is on sys.path when run as a script

PRESET = SMALL_PRESET
BATCH = 8
MODES = {"fp32": {}, "bf16": {"use_bf16": True}, "fp16": {"use_fp16": True}}


def time_steps(device, mode, steps, warmup):
    """Per-step seconds of `steps` timed TrainLoop.run_step calls."""
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**{**script_util.model_and_diffusion_defaults(), **PRESET})
    model.to(device)
    with tempfile.TemporaryDirectory() as log_dir:
        logger.configure(dir=log_dir, format_strs=[])
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=iter(()), batch_size=BATCH, microbatch=-1, lr=1e-4,
            ema_rate="0.9999", log_interval=10**9, save_interval=10**9, resume_checkpoint="", seed=0,
            **MODES[mode],
        )
        batch = torch.rand(BATCH, 3, PRESET["image_size"], PRESET["image_size"]) * 2 - 1
        times = []
        for i in range(warmup + steps):
            _synchronize(device)
            start = time.perf_counter()
            loop.run_step(batch, {})
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--modes", default="fp32,bf16", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")
    print("| mode | median s/step | min | max |")
    print("| --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        times = time_steps(device, mode, args.steps, args.warmup)
        print(f"| {mode} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |", flush=True)


if __name__ == "__main__":
    main()
