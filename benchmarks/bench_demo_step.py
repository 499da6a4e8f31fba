"""
Where the time of one training step of the digits demo goes (scripts/demo.sh's
model: 8x8 grayscale, 64 channels, channel_mult 1,2, one residual block per
level, no attention, class-conditional, v-prediction; batch 64).

    python benchmarks/bench_demo_step.py [--steps 10] [--warmup 3] [--threads 0] [--modes fp32,bf16]

Prints one markdown row per mode: the median seconds of TrainLoop.run_step,
of the bare UNet forward and backward on the same batch (the model's own
work), their ratio, and the share of the step that torch's profiler puts in
convolutions (forward and backward). Data are random tensors in memory.
Run with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to see an
AVX2-only CPU's kernels on a bigger one.
"""

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import profile

from improved_diffusion import logger, script_util
from improved_diffusion.train_util import TrainLoop

DEMO_MODEL = dict(
    image_size=8, image_channels=1, num_channels=64, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
    class_cond=True, num_classes=10, diffusion_steps=1000, noise_schedule="cosine", predict_v=True,
)
BATCH = 64
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward")


def median_seconds(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(mode, steps, warmup):
    """(step s, model fwd+bwd s, share of the step in convolutions) for one precision mode."""
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**{**script_util.model_and_diffusion_defaults(),
                                                                 **DEMO_MODEL})
    x = torch.randn(BATCH, 1, 8, 8)
    cond = {"y": torch.randint(10, (BATCH,))}
    t = torch.randint(1000, (BATCH,))
    with tempfile.TemporaryDirectory() as log_dir:
        logger.configure(dir=log_dir, format_strs=[])
        loop = TrainLoop(model=model, diffusion=diffusion, data=iter(()), batch_size=BATCH, microbatch=-1, lr=2e-3,
                         ema_rate="0.995", log_interval=10**9, save_interval=10**9, resume_checkpoint="", seed=0,
                         use_bf16=mode == "bf16")
        step = median_seconds(lambda: loop.run_step(x, cond), steps, warmup)

        def forward_backward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                out = model(x, t, **cond)
            out.float().square().mean().backward()

        bare = median_seconds(forward_backward, steps, warmup)
        with profile() as prof:
            loop.run_step(x, cond)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    return step, bare, conv / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--modes", default="fp32,bf16", help="comma-separated, of fp32 and bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)")
    print("| mode | run_step s | UNet fwd+bwd s | fwd+bwd / step | convolutions, share of the step |")
    print("| --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        step, bare, conv_share = measure(mode, args.steps, args.warmup)
        print(f"| {mode} | {step:.3f} | {bare:.3f} | {bare / step:.2f} | {conv_share:.2f} |")


if __name__ == "__main__":
    main()
