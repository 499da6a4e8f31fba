"""
The samplers on a real trained model: the digits demo's class-conditional
model (a run of scripts/demo.sh or benchmarks/bench_objectives.py), sampled
through scripts/image_sample.py with each sampler and budget, scored by the
demo's checker: the share of samples classified as the requested digit and
the Fréchet distance of the checker's logits to the real digits'.

    python benchmarks/bench_samplers_digits.py runs/demo/ema_0.995_001500.pt --budgets 5,10,20
    python benchmarks/bench_samplers_digits.py runs/objectives/cfg/ema_0.995_001500.pt --guidance_scales 1,2,4

The second form samples a model trained with --class_dropout_prob at several
classifier-free guidance scales instead.
"""

import argparse
import pathlib
import shutil
import sys
import tempfile

from bench_objectives import checker_logits, real_logits, run  # puts datasets/ on sys.path

import check_digits

from improved_diffusion import samplers
from improved_diffusion.evaluation import feature_statistics, frechet_distance
from improved_diffusion.respace import space_timesteps

SAMPLERS = ("ddim", "plms", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")


def steps_for(sampler, evaluations):
    """The most steps whose cost fits in `evaluations` model evaluations."""
    return max(s for s in range(1, evaluations + 1) if samplers.model_evaluations(sampler, s) <= evaluations)


def score(model_path, sampler, spacing, num_samples, work_dir, real, guidance_scale=1.0):
    """(share recognized, checker-logit FD) of num_samples samples with this sampler, spacing and guidance."""
    out_dir = pathlib.Path(work_dir) / f"{sampler}_{spacing}_{guidance_scale}"
    run("scripts/image_sample.py", ["--model_path", model_path, "--sampler", sampler, "--timestep_respacing",
                                    spacing, "--num_samples", num_samples, "--batch_size", 250, "--seed", 0,
                                    "--guidance_scale", guidance_scale], out_dir)
    images, labels = check_digits.load_samples(next(out_dir.glob("samples_*.npz")))
    share = check_digits.check_samples(images, labels)["share"]
    return share, frechet_distance(*feature_statistics(checker_logits(images)), *real)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path")
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--baseline", default="ddim50", help="the ddim spacing to compare with")
    parser.add_argument("--guidance_scales", default="",
                        help="instead: classifier-free guidance at these scales with --sampler_for_guidance")
    parser.add_argument("--sampler_for_guidance", default="ddim:ddim50")
    parser.add_argument("--grid_dir", default="", help="with --guidance_scales: keep each scale's PNG grid here")
    args = parser.parse_args()
    real = feature_statistics(real_logits())
    if args.guidance_scales:
        return guidance_table(args, real)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        share, fd = score(args.model_path, "ddim", args.baseline, args.num_samples, work_dir, real)
        rows.append((f"ddim ({args.baseline})", len(space_timesteps(1000, args.baseline)), share, fd))
        for sampler in args.samplers.split(","):
            for budget in budgets:
                spacing = f"logsnr{steps_for(sampler, budget)}"
                share, fd = score(args.model_path, sampler, spacing, args.num_samples, work_dir, real)
                rows.append((f"{sampler} ({spacing})", samplers.model_evaluations(sampler, steps_for(sampler, budget)),
                             share, fd))
                print(f"{rows[-1][0]}: {share:.3f}, FD {fd:.2f}", file=sys.stderr, flush=True)
    print("| sampler (spacing) | evaluations | recognized | checker-logit FD |\n| --- | --- | --- | --- |")
    for name, evaluations, share, fd in rows:
        print(f"| {name} | {evaluations} | {share:.3f} | {fd:.2f} |")


def guidance_table(args, real):
    """Print share and FD at each guidance scale; copy each scale's grid to --grid_dir."""
    sampler, spacing = args.sampler_for_guidance.split(":")
    print("| guidance scale | recognized | checker-logit FD |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work_dir:
        for scale in [float(s) for s in args.guidance_scales.split(",")]:
            share, fd = score(args.model_path, sampler, spacing, args.num_samples, work_dir, real, scale)
            print(f"| {scale:g} | {share:.3f} | {fd:.2f} |", flush=True)
            if args.grid_dir:
                grid = next((pathlib.Path(work_dir) / f"{sampler}_{spacing}_{scale}").glob("*_grid.png"))
                pathlib.Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(grid, pathlib.Path(args.grid_dir) / f"guidance_{scale:g}.png")


if __name__ == "__main__":
    main()
