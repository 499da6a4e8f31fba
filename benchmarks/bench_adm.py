"""
Forward+backward speed of an ADM-style (guided-diffusion) 64x64 UNet at a small width.

    python benchmarks/bench_adm.py [--device cpu|cuda] [--num_channels 64] [--num_head_channels 64] [--batch 4] [--iters 3]
                                   [--warmup 1] [--threads N] [--precisions float32,bfloat16]

The configuration is guided-diffusion's ImageNet-64 model (64_64_diffusion.pt:
residual up/downsampling, the new attention order with 64-channel heads,
attention at 32, 16 and 8, scale-shift norm, learned sigma, class labels)
with --num_channels (and --num_head_channels) in place of its 192 (and 64). Prints a markdown table of the
median seconds per training iteration (forward, mean loss, backward; wall
clock and the process's CPU time) per precision, the settings taking turns
step by step, with and without gradient checkpointing.
"""

import argparse
import contextlib

import torch
from bench_unet import time_settings

from improved_diffusion import checkpoint_layout, script_util
from improved_diffusion.precision import cpu_bf16_is_native

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Labelled(torch.nn.Module):
    """The model with fixed class labels, so that it takes (x, t) as bench_unet's steps do."""

    def __init__(self, model, labels):
        super().__init__()
        self.model = model
        self.labels = labels

    def forward(self, x, t):
        return self.model(x, t, y=self.labels)


def build(num_channels, num_head_channels, use_checkpoint, device, labels):
    """The ADM-64 layout at width `num_channels`, in training mode on `device`."""
    flags = checkpoint_layout.guided_checkpoint_flags("64x64_diffusion.pt")
    flags.update(num_channels=num_channels, num_head_channels=num_head_channels, use_checkpoint=use_checkpoint,
                 use_fp16=False)
    model, _ = script_util.create_model_and_diffusion(**flags)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return _Labelled(model.to(device).train(), labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_channels", type=int, default=64)
    parser.add_argument("--num_head_channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--precisions", default="float32,bfloat16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 64, 64, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    settings = {}
    for name in args.precisions.split(","):
        for ckpt in (False, True):
            model = build(args.num_channels, args.num_head_channels, ckpt, device, labels)
            settings[(name, ckpt)] = (model, PRECISIONS[name], contextlib.nullcontext)
    times = time_settings(settings, x, t, args.iters, args.warmup)
    params = sum(p.numel() for p in next(iter(settings.values()))[0].parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    native = "native" if cpu_bf16_is_native() else "emulated"
    print(f"ADM-64 layout at --num_channels {args.num_channels} ({params / 1e6:.1f}M parameters), batch "
          f"{args.batch} of 3x64x64, {where}" + (f", CPU bfloat16 {native}" if device.type == "cpu" else ""))
    print()
    print("| precision | checkpointing | wall s/iter | CPU s/iter |")
    print("| --- | --- | --- | --- |")
    for (name, ckpt), (wall, cpu) in times.items():
        print(f"| {name} | {'yes' if ckpt else 'no'} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
