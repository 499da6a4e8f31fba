"""
Restoration on a real trained model (benchmarks/restoration.md): an
unconditional copy of the digits demo's model, trained without the held-out
digits, restores held-out real digits from their right half masked out and
from their 2x2 block means, with each method of improved_diffusion/restoration.py
at several budgets of model evaluations. Scored by the demo's checker (the
share of restorations it reads as the original digit) and by the measurement
error ||A(x) - y||; timed against unconditional DDIM sampling of the same
number of evaluations, in the same process and batch, in CPU seconds of this
process (one thread; other jobs on a shared machine disturb them far less
than wall time), the fastest of --repeats runs taken in turns.

    python benchmarks/bench_restoration.py --write_train_split runs/restore_digits/train
    OPENAI_LOGDIR=runs/restore_digits/run OMP_NUM_THREADS=1 python scripts/image_train.py \\
        --data_dir runs/restore_digits/train --image_size 8 --image_channels 1 --num_channels 64 \\
        --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions "" --class_cond False \\
        --diffusion_steps 1000 --noise_schedule cosine --predict_v True --lr 2e-3 --batch_size 64 \\
        --ema_rate 0.995 --max_steps 600 --seed 0 --use_bf16 True
    python benchmarks/bench_restoration.py --model_path runs/restore_digits/run/ema_0.995_000600.pt

Held out: the digits whose index in scikit-learn's list is a multiple of
HELD_OUT_EVERY (360 of 1,797); the first --num_images of them are restored.
"""

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "datasets"))

import check_digits  # noqa: E402  (datasets/ is not a package on sys.path otherwise)
import digits  # noqa: E402

from improved_diffusion import image_output, restoration  # noqa: E402
from improved_diffusion.model_loading import load_model  # noqa: E402
from improved_diffusion.operators import Inpaint, SuperRes, make_mask  # noqa: E402
from improved_diffusion.run_flags import read_run_flags  # noqa: E402
from improved_diffusion.script_util import diffusion_from_flags  # noqa: E402

HELD_OUT_EVERY = 5
SIZE = 8
# name: (method, sampler, its arguments, walk lengths); repaint's evaluations follow from its plan.
PLANS = {
    "replace": ("replace", "ddim", {}, (10, 25, 50)),
    "ddnm": ("ddnm", "ddim", {}, (10, 25, 50)),
    "ddnm 2m": ("ddnm", "dpmpp_2m", {}, (10, 25)),
    "dps 0.3": ("dps", "ddim", {"scale": 0.3}, (10, 25, 50)),
    "dps 1.0": ("dps", "ddim", {"scale": 1.0}, (25, 50)),
    "repaint 5x5": ("repaint", "ddpm", {"jump_length": 5, "jump_n_sample": 5}, (10, 25)),
    "sdedit 0.5": ("sdedit", "ddim", {"t_start": 0.5}, (25, 50)),
}
TIMED_STEPS = 25
GRID_ROWS = 8


def held_out_digits(count):
    """(uint8 [count x 8 x 8 x 1], labels [count]): the first `count` held-out digits, rendered as the demo's."""
    levels, labels = digits.load_digit_arrays()
    chosen = np.arange(0, len(levels), HELD_OUT_EVERY)[:count]
    images = np.stack([np.asarray(digits.render_digit(levels[i], SIZE).convert("L")) for i in chosen])
    return images[..., None], labels[chosen]


def write_train_split(folder):
    """The demo's dataset without the held-out digits, as datasets/digits.py names its files."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    levels, labels = digits.load_digit_arrays()
    for index, (image, label) in enumerate(zip(levels, labels)):
        if index % HELD_OUT_EVERY:
            digits.render_digit(image, SIZE).save(folder / f"{label}_{index:05d}.png")
    print(f"wrote {len(levels) - len(range(0, len(levels), HELD_OUT_EVERY))} training digits to {folder}")


def restore_with(model, model_flags, x, operator, plan, steps, seed=0):
    """(restorations [N x 1 x 8 x 8], seconds, evaluations per restoration) of one plan at one walk length."""
    method, sampler, args, _ = plan
    diffusion = diffusion_from_flags(dict(model_flags, timestep_respacing=f"ddim{steps}"))
    start = time.process_time()
    restored = restoration.restore(diffusion, model, operator(x), operator, method=method, sampler=sampler,
                                   generator=torch.Generator().manual_seed(seed), **args)
    return restored, time.process_time() - start, restoration.model_evaluations(method, sampler, steps, **args)


def unconditional_seconds(model, model_flags, shape, evaluations):
    """Seconds of unconditional DDIM sampling of `shape` with `evaluations` evenly spaced steps."""
    diffusion = diffusion_from_flags(dict(model_flags, timestep_respacing=str(evaluations)))
    start = time.process_time()
    with torch.no_grad():
        diffusion.sample_loop(model, shape, sampler="ddim", generator=torch.Generator().manual_seed(0))
    return time.process_time() - start


def quality_rows(model, model_flags, x, labels, tasks, plans, walk_lengths=None):
    """
    Print a row per task, plan and walk length (the plan's, or `walk_lengths`): evaluations, the share
    read as the original digit, ||A(x) - y||.
    """
    print("| task | plan | sampler | steps | evaluations | read as the original | mean ‖A(x) − y‖ |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for task, operator in tasks.items():
        for name in plans:
            plan = PLANS[name]
            for steps in walk_lengths or plan[3]:
                restored, _, evaluations = restore_with(model, model_flags, x, operator, plan, steps)
                share = check_digits.check_samples(image_output.to_uint8_images(restored), labels)["share"]
                error = (operator(restored) - operator(x)).flatten(1).norm(dim=1).mean().item()
                print(f"| {task} | {name} | {plan[1]} | {steps} | {evaluations} | {share:.2f} | {error:.3g} |",
                      flush=True)


def timing_rows(model, model_flags, x, operator, plans, repeats, steps=TIMED_STEPS):
    """
    Print a row per plan: milliseconds per restoration over a walk of `steps` and the ratio to
    unconditional DDIM of the same evaluations, each the fastest of `repeats` runs taken in turns.
    """
    print("\n| plan | sampler | evaluations | CPU ms per restoration | unconditional DDIM, same evaluations | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in plans:
        plan = PLANS[name]
        times, baselines = [], []
        for _ in range(repeats):
            _, seconds, evaluations = restore_with(model, model_flags, x, operator, plan, steps)
            times.append(seconds)
            baselines.append(unconditional_seconds(model, model_flags, x.shape, evaluations))
        best, baseline = min(times), min(baselines)
        print(f"| {name} | {plan[1]} | {evaluations} | {best / len(x) * 1000:.2f} | "
              f"{baseline / len(x) * 1000:.2f} | {best / baseline:.2f}x |", flush=True)


def write_grid(path, model, model_flags, x, tasks, plans, steps=TIMED_STEPS):
    """A PNG: per digit, the original, then per task the measurement and each plan's restoration."""
    x = x[:GRID_ROWS]
    columns = [image_output.to_uint8_images(x)]
    for operator in tasks.values():
        columns.append(image_output.to_uint8_images(operator.as_image(operator(x))))
        for name in plans:
            columns.append(image_output.to_uint8_images(restore_with(model, model_flags, x, operator, PLANS[name],
                                                                     steps)[0]))
    tiles = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    grid = image_output.image_grid(image_output.enlarge(tiles, 32), columns=len(columns))
    image_output.write_png(path, grid)
    print(f"grid: {path} (columns: original, then per task the measurement and {', '.join(plans)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="")
    parser.add_argument("--write_train_split", default="", help="write the training folder here and stop")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated names of PLANS")
    parser.add_argument("--timed", default="replace,ddnm,dps 0.3,repaint 5x5,sdedit 0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="", help="write a PNG grid of originals, measurements and restorations")
    parser.add_argument("--grid_plans", default="replace,repaint 5x5,ddnm,dps 0.3")
    parser.add_argument("--steps", default="", help="walk lengths for every plan (default: each plan's own)")
    parser.add_argument("--timed_steps", type=int, default=TIMED_STEPS)
    args = parser.parse_args()
    if args.write_train_split:
        return write_train_split(args.write_train_split)
    torch.set_num_threads(args.threads)
    model_flags = read_run_flags(args.model_path)
    model, _ = load_model(args.model_path, model_flags)
    images, labels = held_out_digits(args.num_images)
    x = image_output.from_uint8_images(images, "cpu")
    tasks = {"inpaint right half": Inpaint(make_mask("half", SIZE, SIZE)), "super_res 2x": SuperRes(2)}
    print(f"{len(x)} held-out digits; the checker reads {check_digits.check_samples(images, labels)['share']:.2f} "
          "of the originals as their digit\n")
    if args.grid:
        write_grid(args.grid, model, model_flags, x, tasks, args.grid_plans.split(","), args.timed_steps)
    if args.plans:
        walk_lengths = [int(s) for s in args.steps.split(",")] if args.steps else None
        quality_rows(model, model_flags, x, labels, tasks, args.plans.split(","), walk_lengths)
    if args.timed:
        timing_rows(model, model_flags, x, tasks["super_res 2x"], args.timed.split(","), args.repeats,
                    args.timed_steps)


if __name__ == "__main__":
    main()
