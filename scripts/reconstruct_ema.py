"""
Reconstruct an EMA of any length after training from the power-function EMA
snapshots of a run (post-hoc EMA, Karras et al. 2024; see
improved_diffusion/posthoc_ema.py).

    python scripts/reconstruct_ema.py --log_dir D --ema_std 0.08 [--step N]
    python scripts/reconstruct_ema.py --log_dir D --ema_std 0.03,0.05,0.08,0.12

Reads the snapshots phema_{std}_{N}.pt in D (written by training with
--ema_std) up to update N (default: the newest), finds the least-squares
combination of them whose averaging profile is closest to sigma_rel, prints
its coefficients and the relative error of the profile, and writes
D/ema_std{sigma_rel:.3f}_{N:06d}.pt, a state dict with the model's keys. The
run's flags.json is beside it, so the sampling scripts load it from
--model_path alone.
"""

import math

import blobfile as bf

from improved_diffusion import cli, posthoc_ema
from improved_diffusion.errors import UsageError
from improved_diffusion.flags import parse
from improved_diffusion.io_util import atomic_torch_save, load_checkpoint


def parse_args(argv=None):
    """The parsed flags, args.ema_std as a checked list of floats."""
    args, _ = parse("reconstruct_ema", argv, __doc__)
    if not args.log_dir or not args.ema_std:
        raise UsageError("--log_dir and --ema_std are required: the run's folder and the sigma_rel to build")
    try:
        args.ema_std = posthoc_ema.parse_stds(args.ema_std)
    except ValueError as exc:
        raise UsageError(f"--ema_std {args.ema_std}: {exc}") from None
    if args.step is not None and args.step < 1:
        raise UsageError(f"--step {args.step}: must be >= 1 (it counts optimizer updates)")
    return args


def select_snapshots(log_dir, step):
    """(step, [(step, std, path)] of the snapshots up to it); UsageError when there are none."""
    snapshots = posthoc_ema.list_snapshots(log_dir)
    if not snapshots:
        raise UsageError(
            f"--log_dir {log_dir}: no post-hoc EMA snapshots (phema_STD_NNNNNN.pt) there; "
            f"train with --ema_std (e.g. --ema_std 0.05,0.10) to write them"
        )
    step = snapshots[-1][0] if step is None else step
    used = [s for s in snapshots if s[0] <= step]
    if not used:
        first_step, _, first_path = snapshots[0]
        raise UsageError(
            f"--step {step} is before the first snapshot ({bf.basename(first_path)}, step {first_step}); "
            f"pass --step {first_step} or later"
        )
    return step, used


def fit_all(stds, used, step):
    """{std: ProfileFit}; UsageError for a sigma_rel the snapshots cannot represent."""
    in_steps = [s for s, _, _ in used]
    in_stds = [std for _, std, _ in used]
    fits = {}
    for std in stds:
        fit = posthoc_ema.fit_profile(in_steps, in_stds, step, std)
        if fit.relative_error > posthoc_ema.MAX_RELATIVE_ERROR:
            covered = posthoc_ema.representable_std_range(in_steps, in_stds, step)
            if covered is None:
                cover = "they represent no sigma_rel that well"
            else:
                lo, hi = math.ceil(covered[0] * 1000) / 1000, math.floor(covered[1] * 1000) / 1000
                cover = f"they cover sigma_rel {lo:.3f} to {hi:.3f}: choose one in that range"
            tracked = ", ".join(f"{s:.3f}" for s in sorted(set(in_stds)))
            raise UsageError(
                f"--ema_std {std}: the {len(used)} snapshots up to step {step} (sigma_rel {tracked}, the last "
                f"at step {in_steps[-1]}) cannot "
                f"represent sigma_rel {std} (relative error of the profile {fit.relative_error:.3f} > "
                f"{posthoc_ema.MAX_RELATIVE_ERROR}); {cover}, or train with more frequent snapshots"
            )
        fits[std] = fit
    return fits


def reconstruct(log_dir, step, std, fit, used):
    """Print the fit, combine the snapshots and write ema_std{std}_{step}.pt; returns its path."""
    print(f"sigma_rel {std:.3f} at step {step}: coefficients of {len(used)} snapshots", flush=True)
    for (_, _, path), coefficient in zip(used, fit.coefficients):
        print(f"  {bf.basename(path)} -> {coefficient:+.6f}")
    print(f"  relative error of the profile: {fit.relative_error:.2e}", flush=True)
    paths = [path for _, _, path in used]
    state = posthoc_ema.combine_state_dicts((load_checkpoint(p) for p in paths), fit.coefficients, names=paths)
    out = bf.join(log_dir, f"ema_std{std:.3f}_{step:06d}.pt")
    atomic_torch_save(state, out)
    print(f"wrote {out}", flush=True)
    return out


@cli.script
def main(argv=None):
    args = parse_args(argv)
    step, used = select_snapshots(args.log_dir, args.step)
    for std, fit in fit_all(args.ema_std, used, step).items():
        reconstruct(args.log_dir, step, std, fit, used)


if __name__ == "__main__":
    main()
