"""
Cost of post-hoc EMA tracking per optimizer update: PowerFunctionEMA with two
profiles (`--ema_std 0.05,0.10`) against the EMAs of `--ema_rate`
(nn.update_ema, one lerp per rate), on the parameters of the CIFAR-10 UNet
(bench_unet.CIFAR10_FLAGS; `--num_channels` scales it down for a quick check).

    python benchmarks/bench_posthoc_ema.py [--device cpu|cuda] [--repeats 20] [--warmup 3] [--threads N]
                                           [--num_channels 128]

Prints a markdown table: per setting, the copies of the weights it keeps, their
memory (exact: the bytes of the tensors it holds; the same as the allocation
delta on CUDA) and the median, minimum and maximum milliseconds of one
update. The settings take turns update by update, so a change in the
machine's load hits them alike. Between updates the weights move by a fixed
random step, as an optimizer would move them.
"""

import argparse
import statistics
import time

import torch

from improved_diffusion.nn import update_ema
from improved_diffusion.posthoc_ema import PowerFunctionEMA
from improved_diffusion.script_util import create_model

from bench_unet import CIFAR10_FLAGS  # benchmarks/ is on sys.path when run as a script


class RateEMAs:
    """The EMAs of --ema_rate as TrainLoop keeps them on CPU: one parameter copy per rate, nn.update_ema."""

    def __init__(self, params, rates):
        self.params = params
        self.rates = rates
        self.averages = [[p.detach().clone() for p in params] for _ in rates]

    def update(self, n):
        for rate, average in zip(self.rates, self.averages):
            update_ema(average, self.params, rate=rate)


def held_bytes(averages):
    return sum(t.numel() * t.element_size() for copy in averages for t in copy)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--num_channels", type=int, default=CIFAR10_FLAGS["num_channels"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(**dict(CIFAR10_FLAGS, num_channels=args.num_channels)).to(device)
    params = [p.detach() for p in model.parameters()]
    steps = [torch.randn_like(p) * 1e-4 for p in params]
    settings = {}
    for name, make in [
        ("`--ema_rate 0.9999` (nn.update_ema)", lambda: RateEMAs(params, [0.9999])),
        ("`--ema_rate 0.9999,0.999` (nn.update_ema)", lambda: RateEMAs(params, [0.9999, 0.999])),
        ("`--ema_std 0.05,0.10` (PowerFunctionEMA)", lambda: PowerFunctionEMA(params, [0.05, 0.10])),
    ]:
        _sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        tracker = make()
        memory = held_bytes(tracker.averages)
        if before is not None:
            assert torch.cuda.memory_allocated(device) - before == memory
        settings[name] = (tracker, memory, [])
    for n in range(1, args.warmup + args.repeats + 1):
        torch._foreach_add_(params, steps)
        for tracker, _, times in settings.values():
            _sync(device)
            start = time.perf_counter()
            tracker.update(n)
            _sync(device)
            if n > args.warmup:
                times.append(time.perf_counter() - start)
    count = sum(p.numel() for p in params)
    print(f"device {device}, {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, "
          f"{count / 1e6:.1f}M parameters ({args.num_channels} channels), {args.repeats} updates")
    print("| setting | weight copies | memory MiB | median ms/update | min | max | median / one rate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    baseline = None
    for name, (tracker, memory, times) in settings.items():
        median = statistics.median(times)
        baseline = baseline or median
        print(f"| {name} | {len(tracker.averages)} | {memory / 2**20:.1f} | {median * 1e3:.2f} | "
              f"{min(times) * 1e3:.2f} | {max(times) * 1e3:.2f} | {median / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
