"""
The sampler's own cost per step, with a near-free model.

DDIM with 50 steps respaced from 4000 cosine steps, batch 64 of 3x32x32, the
model a constant (so only the diffusion arithmetic is timed). For a ratio
within one run it also times the same loop with the device-table cache
disabled, which rebuilds each table read from NumPy as the reference does.

    python benchmarks/bench_diffusion.py [--device cuda] [--repeats 20]
"""

import argparse
import statistics
import time

import torch

from improved_diffusion.gaussian_diffusion import GaussianDiffusion
from improved_diffusion.script_util import create_gaussian_diffusion


class ConstantModel(torch.nn.Module):
    """Returns one preallocated tensor: a model that costs nothing."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t):
        return self.output


def uncached_tables(self, device):
    """The reference's behaviour: every read builds the tables from NumPy again."""
    self._device_tables.clear()
    return GaussianDiffusion._tables(self, device)


def time_loop(diffusion, model, shape, device, repeats):
    """Median seconds per sampling step over `repeats` whole ddim loops."""
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        diffusion.ddim_sample_loop(model, shape, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / diffusion.num_timesteps)
    return statistics.median(times[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = (args.batch_size, 3, 32, 32)
    print("| variance | tables | ms per step | ratio |\n|---|---|---|---|")
    for learn_sigma in (False, True):
        diffusion = create_gaussian_diffusion(
            steps=4000, learn_sigma=learn_sigma, noise_schedule="cosine",
            rescale_timesteps=True, timestep_respacing="ddim50",
        )
        channels = 6 if learn_sigma else 3
        model = ConstantModel(torch.randn(args.batch_size, channels, 32, 32, device=device).clamp(-1, 1))
        cached = time_loop(diffusion, model, shape, device, args.repeats)
        diffusion._tables = uncached_tables.__get__(diffusion)
        uncached = time_loop(diffusion, model, shape, device, args.repeats)
        name = "learned range" if learn_sigma else "fixed large"
        print(f"| {name} | rebuilt per read (reference) | {uncached * 1e3:.3f} | 1.00 |")
        print(f"| {name} | on device, cached | {cached * 1e3:.3f} | {cached / uncached:.2f} |")


if __name__ == "__main__":
    main()
