"""
Time openai/improved-diffusion and this library on the same machine in one
process, taking turns (reference, ours, reference, ours, ...), so that the
speed targets of the issues, which are ratios to the reference, are measured
under the same load.

    python benchmarks/compare_reference.py --reference_dir DIR
        [--which unet,train,sample] [--repeats N] [--warmup W] [--threads 2] [--compile]

DIR is a checkout of openai/improved-diffusion (the folder that holds its
`improved_diffusion/` package); it is imported as `ref_improved_diffusion`, so
both libraries live side by side. Nothing of it is part of this repository.

Workloads, configured exactly as the benchmarks of this folder:
  unet    forward+backward of the CIFAR-10 UNet at batch 8 (bench_unet.py);
          float32 on both sides, bf16 autocast on both sides.
  train   TrainLoop.run_step on the small preset at batch 8 (bench_train.py);
          reference float32, ours float32 and --use_bf16.
  sample  ddim_sample_loop of the small preset, ddim50, batch 8 (bench_sample.py);
          reference float32, ours float32 and bf16 (and bf16 with torch.compile
          when --compile is given).
Both sides start from the same weights. The table gives median wall seconds,
the ratio ours / reference, and median process CPU seconds.
"""

import argparse
import contextlib
import importlib
import itertools
import pathlib
import statistics
import sys
import tempfile
import time
import types

import bench_sample
import bench_unet
import torch
from presets import SMALL_PRESET  # benchmarks/ is on sys.path when run as a script

from improved_diffusion import logger, script_util
from improved_diffusion.train_util import TrainLoop

DEVICE = torch.device("cpu")
REFERENCE = "ref_improved_diffusion"
ROUNDS = {
    "unet": (3, 1),
    "train": (10, 3),
    "sample": (3, 1),
}  # (timed, warm-up), as the bench scripts


def load_reference(reference_dir):
    """Import the reference's package from `reference_dir` as ref_improved_diffusion; return its modules."""
    package_dir = pathlib.Path(reference_dir) / "improved_diffusion"
    if not (package_dir / "unet.py").is_file():
        sys.exit(
            f"--reference_dir {reference_dir}: no improved_diffusion/unet.py there; give the checkout's root"
        )
    package = types.ModuleType(REFERENCE)
    package.__path__ = [str(package_dir)]
    sys.modules[REFERENCE] = package
    names = ("dist_util", "logger", "script_util", "train_util")
    return types.SimpleNamespace(
        **{name: importlib.import_module(f"{REFERENCE}.{name}") for name in names}
    )


def timed(fn):
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(settings, repeats, warmup):
    """Run the settings (name -> callable) in turns; name -> (median wall, median CPU) of the timed rounds."""
    times = {name: [] for name in settings}
    for i in range(warmup + repeats):
        for name, fn in settings.items():
            measured = timed(fn)
            if i >= warmup:
                times[name].append(measured)
    return {
        name: tuple(statistics.median(column) for column in zip(*runs))
        for name, runs in times.items()
    }


def unet_settings(ref, args, _stack):
    ours = bench_unet.build(DEVICE)
    theirs = ref.script_util.create_model(**bench_unet.CIFAR10_FLAGS)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.train()
    x, t = bench_unet.batch(DEVICE, args.batch)
    step = bench_unet.train_step
    settings = {
        "ref fp32": lambda: step(theirs, x, t, torch.float32),
        "ours fp32": lambda: step(ours, x, t, torch.float32),
        "ref bf16": lambda: step(theirs, x, t, torch.bfloat16),
        "ours bf16": lambda: step(ours, x, t, torch.bfloat16),
    }
    rows = [
        ("UNet fwd+bwd, float32", "ref fp32", "ours fp32"),
        ("UNet fwd+bwd, ours bf16 vs reference float32", "ref fp32", "ours bf16"),
        ("UNet fwd+bwd, both under bf16 autocast", "ref bf16", "ours bf16"),
    ]
    return settings, rows


def train_settings(ref, args, stack):
    log_dir = stack.enter_context(tempfile.TemporaryDirectory())
    logger.configure(dir=log_dir, format_strs=[])
    ref.logger.configure(dir=log_dir, format_strs=[])
    ref.dist_util.setup_dist()  # the reference's TrainLoop needs a process group
    flags = {**script_util.model_and_diffusion_defaults(), **SMALL_PRESET}
    common = {
        "batch_size": args.batch,
        "microbatch": -1,
        "lr": 1e-4,
        "ema_rate": "0.9999",
        "log_interval": 10**9,
        "save_interval": 10**9,
        "resume_checkpoint": "",
    }

    def our_loop(**mode):
        torch.manual_seed(0)
        model, diffusion = script_util.create_model_and_diffusion(**flags)
        return TrainLoop(
            model=model, diffusion=diffusion, data=iter(()), seed=0, **common, **mode
        )

    ours_fp32, ours_bf16 = our_loop(), our_loop(use_bf16=True)
    theirs, their_diffusion = ref.script_util.create_model_and_diffusion(
        **{**ref.script_util.model_and_diffusion_defaults(), **SMALL_PRESET}
    )
    theirs.load_state_dict(
        ours_bf16.model.state_dict(), strict=True
    )  # the initial weights (no step taken yet)
    batch = torch.rand(args.batch, 3, flags["image_size"], flags["image_size"]) * 2 - 1
    their_loop = ref.train_util.TrainLoop(
        model=theirs,
        diffusion=their_diffusion,
        data=itertools.repeat((batch, {})),
        use_fp16=False,
        **common,
    )
    settings = {
        "ref fp32": lambda: their_loop.run_step(batch, {}),
        "ours fp32": lambda: ours_fp32.run_step(batch, {}),
        "ours bf16": lambda: ours_bf16.run_step(batch, {}),
    }
    rows = [
        ("TrainLoop.run_step, float32", "ref fp32", "ours fp32"),
        (
            "TrainLoop.run_step, ours --use_bf16 vs reference float32",
            "ref fp32",
            "ours bf16",
        ),
    ]
    return settings, rows


def sample_settings(ref, args, _stack):
    ours_fp32 = bench_sample.build(str(DEVICE), "float32", False)
    ours_bf16 = bench_sample.build(str(DEVICE), "bf16", False)
    theirs, their_diffusion = ref.script_util.create_model_and_diffusion(
        **{**ref.script_util.model_and_diffusion_defaults(), **bench_sample.PRESET}
    )
    theirs.load_state_dict(ours_fp32[0].state_dict(), strict=True)
    theirs.eval()
    shape = (
        args.batch,
        3,
        bench_sample.PRESET["image_size"],
        bench_sample.PRESET["image_size"],
    )

    def their_loop():
        torch.manual_seed(0)
        with torch.inference_mode():
            their_diffusion.ddim_sample_loop(theirs, shape, device=DEVICE, eta=0.0)

    settings = {
        "ref fp32": their_loop,
        "ours fp32": lambda: bench_sample.time_sampling(
            *ours_fp32, args.batch, str(DEVICE)
        ),
        "ours bf16": lambda: bench_sample.time_sampling(
            *ours_bf16, args.batch, str(DEVICE)
        ),
    }
    rows = [
        ("ddim_sample_loop, float32", "ref fp32", "ours fp32"),
        ("ddim_sample_loop, ours bf16 vs reference float32", "ref fp32", "ours bf16"),
    ]
    if args.compile:
        compiled = bench_sample.build(str(DEVICE), "bf16", True)
        settings["ours bf16 compiled"] = lambda: bench_sample.time_sampling(
            *compiled, args.batch, str(DEVICE)
        )
        rows.append(
            (
                "ddim_sample_loop, ours bf16 + --compile vs reference float32",
                "ref fp32",
                "ours bf16 compiled",
            )
        )
    return settings, rows


WORKLOADS = {"unet": unet_settings, "train": train_settings, "sample": sample_settings}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference_dir", required=True, help="a checkout of openai/improved-diffusion"
    )
    parser.add_argument(
        "--which",
        default="unet,train,sample",
        help=f"comma-separated, of {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds (default: as the bench scripts)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds (default: as the bench scripts)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add our bf16 sampling with torch.compile",
    )
    args = parser.parse_args()
    which = [name for name in args.which.split(",") if name]
    if set(which) - set(WORKLOADS):
        parser.error(
            f"unknown workload(s) in --which {args.which}; choose from {', '.join(WORKLOADS)}"
        )
    ref = load_reference(args.reference_dir)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
        f"CPU {bench_sample.cpu_name()}"
    )
    print(
        "| workload | reference s | ours s | ours / reference | reference CPU s | ours CPU s | timed rounds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with contextlib.ExitStack() as stack:
        for name in which:
            repeats = ROUNDS[name][0] if args.repeats is None else args.repeats
            warmup = ROUNDS[name][1] if args.warmup is None else args.warmup
            settings, table = WORKLOADS[name](ref, args, stack)
            results = alternate(settings, repeats, warmup)
            for label, theirs, ours in table:
                (ref_wall, ref_cpu), (our_wall, our_cpu) = (
                    results[theirs],
                    results[ours],
                )
                print(
                    f"| {label} | {ref_wall:.3f} | {our_wall:.3f} | {our_wall / ref_wall:.2f} "
                    f"| {ref_cpu:.3f} | {our_cpu:.3f} | {repeats} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
