"""
Time DDIM sampling with the small preset: a 32x32 UNet (64 channels, 2
residual blocks per level, attention at 16x16 and 8x8 with 4 heads, learned
sigmas) over the cosine schedule of 4000 steps respaced to ddim50, one batch.

    python benchmarks/bench_sample.py                  # float32 on CPU
    python benchmarks/bench_sample.py --use_bf16       # bfloat16 autocast (image_sample.py --use_bf16 True)
    python benchmarks/bench_sample.py --device cuda --use_fp16 --compile

Weights are random (the zero-initialized layers too, so no path is trivially
zero). Prints one Markdown table row per run: the median and best wall time
of --repeats timed runs after one warm-up run.
"""

import argparse
import statistics
import subprocess
import time

import torch

from improved_diffusion.sample_util import AutocastModel
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

PRESET = dict(
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    learn_sigma=True,
    noise_schedule="cosine",
    diffusion_steps=4000,
    timestep_respacing="ddim50",
    attention_resolutions="16,8",
    num_heads=4,
)


def build(device, use_fp16, use_bf16, compile_model):
    """The preset model (random weights, eval mode, on `device`) and its diffusion."""
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **PRESET})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.to(device).eval()
    if use_fp16:
        model.convert_to_fp16()
    if use_bf16:
        model = AutocastModel(model)
    if compile_model:
        model = torch.compile(model)
    return model, diffusion


def time_sampling(model, diffusion, batch_size, device):
    """Seconds for one ddim_sample_loop over a [batch_size x 3 x 32 x 32] batch."""
    shape = (batch_size, 3, PRESET["image_size"], PRESET["image_size"])
    generator = torch.Generator(device=device).manual_seed(0)
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        diffusion.ddim_sample_loop(model, shape, device=device, generator=generator, eta=0.0)
    _synchronize(device)
    return time.perf_counter() - start


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
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--use_bf16", action="store_true", help="bfloat16 autocast around the model")
    parser.add_argument("--use_fp16", action="store_true", help="float16 weights (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--reference_s", type=float, default=7.0, help="reference time to compare with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, diffusion = build(args.device, args.use_fp16, args.use_bf16, args.compile)
    time_sampling(model, diffusion, args.batch_size, args.device)
    times = [time_sampling(model, diffusion, args.batch_size, args.device) for _ in range(args.repeats)]
    median = statistics.median(times)
    precision = "bf16 autocast" if args.use_bf16 else "fp16" if args.use_fp16 else "float32"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| device | precision | compile | batch | median s | best s | vs reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.device} | {precision} | {'yes' if args.compile else 'no'} | {args.batch_size} "
        f"| {median:.2f} | {min(times):.2f} | {median / args.reference_s:.2f}x |"
    )


if __name__ == "__main__":
    main()
