"""
The samplers on a real trained model: the digits demo's class-conditional
model (a run of scripts/demo.sh or benchmarks/bench_objectives.py), sampled
through scripts/image_sample.py with each sampler and budget, scored by the
demo's checker: the share of samples classified as the requested digit and
the Fréchet distance of the checker's logits to the real digits'.

    python benchmarks/bench_samplers_digits.py runs/demo/ema_0.995_001500.pt --budgets 5,10,20
"""

import argparse
import pathlib
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


def score(model_path, sampler, spacing, num_samples, work_dir, real):
    """(share recognized, checker-logit FD) of num_samples samples with this sampler and spacing."""
    out_dir = pathlib.Path(work_dir) / f"{sampler}_{spacing}"
    run("scripts/image_sample.py", ["--model_path", model_path, "--sampler", sampler, "--timestep_respacing",
                                    spacing, "--num_samples", num_samples, "--batch_size", 250, "--seed", 0], out_dir)
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
    args = parser.parse_args()
    real = feature_statistics(real_logits())
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


if __name__ == "__main__":
    main()
