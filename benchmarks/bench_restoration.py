"""
Restoration on a real trained model (benchmarks/restoration.md): an
unconditional copy of the digits demo's model, trained without the held-out
digits, restores held-out real digits from their right half masked out and
from their 2x2 block means, with each method of improved_diffusion/restoration.py
at several budgets of model evaluations. Scored by the demo's checker (the
share of restorations it reads as the original digit) and by the measurement
error ||A(x) - y||; timed against unconditional DDIM sampling of the same
number of evaluations, in the same process and batch (ratios within one run).

    python benchmarks/bench_restoration.py --write_train_split runs/restore_digits/train
    OPENAI_LOGDIR=runs/restore_digits/run python scripts/image_train.py --data_dir runs/restore_digits/train \\
        DEMO_FLAGS --class_cond False
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
# (method, sampler, its arguments, steps of the walk) at each budget; repaint's evaluations follow from its plan.
PLANS = {
    "replace": ("ddim", {}, (10, 25, 50, 100)),
    "ddnm": ("ddim", {}, (10, 25, 50, 100)),
    "dps": ("ddim", {"scale": 0.1}, (10, 25, 50, 100)),
    "repaint": ("ddpm", {"jump_length": 5, "jump_n_sample": 5}, (10, 25, 50)),
}


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


def timed(function):
    start = time.perf_counter()
    out = function()
    return out, time.perf_counter() - start


def run_case(model, model_flags, x, labels, operator, method, sampler, args, steps, seed=0):
    """One row: (evaluations, share read as the original digit, mean ||A(x) - y||, seconds, unconditional seconds)."""
    diffusion = diffusion_from_flags(dict(model_flags, timestep_respacing=f"ddim{steps}"))
    y = operator(x)
    generator = torch.Generator().manual_seed(seed)
    restored, seconds = timed(lambda: restoration.restore(diffusion, model, y, operator, method=method,
                                                          sampler=sampler, generator=generator, **args))
    evaluations = restoration.model_evaluations(method, sampler, steps, **args)
    unconditional = diffusion_from_flags(dict(model_flags, timestep_respacing=f"ddim{evaluations}"))
    with torch.no_grad():
        _, baseline = timed(lambda: unconditional.sample_loop(model, x.shape, sampler="ddim",
                                                              generator=torch.Generator().manual_seed(seed)))
    images = image_output.to_uint8_images(restored)
    share = check_digits.check_samples(images, labels)["share"]
    error = (operator(restored) - y).flatten(1).norm(dim=1).mean().item()
    return evaluations, share, error, seconds, baseline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="")
    parser.add_argument("--write_train_split", default="", help="write the training folder here and stop")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--methods", default=",".join(PLANS))
    parser.add_argument("--budgets", default="", help="walk lengths to run (default: each method's plan)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="", help="write a PNG grid of originals, measurements and restorations")
    args = parser.parse_args()
    if args.write_train_split:
        return write_train_split(args.write_train_split)
    torch.set_num_threads(args.threads)
    model_flags = read_run_flags(args.model_path)
    model, _ = load_model(args.model_path, model_flags)
    images, labels = held_out_digits(args.num_images)
    x = image_output.from_uint8_images(images, "cpu")
    tasks = {"inpaint right half": Inpaint(make_mask("half", SIZE, SIZE)), "super_res 2x": SuperRes(2)}
    print(f"checker on the held-out originals: {check_digits.check_samples(images, labels)['share']:.3f}")
    print("| task | method (sampler) | steps | evaluations | read as the original | mean ‖A(x) − y‖ "
          "| s per restoration | / unconditional DDIM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for task, operator in tasks.items():
        for method in args.methods.split(","):
            sampler, method_args, budgets = PLANS[method]
            if args.budgets:
                budgets = [int(b) for b in args.budgets.split(",")]
            for steps in budgets:
                evaluations, share, error, seconds, baseline = run_case(
                    model, model_flags, x, labels, operator, method, sampler, method_args, steps)
                print(f"| {task} | {method} ({sampler}) | {steps} | {evaluations} | {share:.2f} | {error:.3g} "
                      f"| {seconds / len(x) * 1000:.2f} ms | {seconds / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
