"""
Search the --steps timesteps at which --sampler does best on a model (a
GITS-style dynamic-programming search on a small batch drawn from the model
itself; see improved_diffusion/timestep_search.py) and write them as JSON, for
`image_sample.py --timestep_respacing FILE.json`: base timesteps for the DDPM
family, noise levels sigma for --objective edm, times t for flow. Prints the
error of the found timesteps beside the fixed spacings of the same length
(trailing or uniform, logsnr and karras).
"""

import json

import torch

from improved_diffusion import cli, dist_util, logger, sample_util, samplers
from improved_diffusion.errors import UsageError
from improved_diffusion.io_util import atomic_write_bytes
from improved_diffusion.sample_seeds import sample_generators
from improved_diffusion.script_util import image_size_hw
from improved_diffusion.timestep_search import search_timesteps


def check_flags(args):
    if args.sampler in samplers.STOCHASTIC and args.sampler != "ddim":
        raise UsageError(f"--sampler {args.sampler} draws noise at every step: search for a deterministic sampler")
    if args.timestep_respacing:
        raise UsageError("--timestep_respacing does not apply: the search picks the timesteps itself")
    if args.objective == "ddpm" and not 1 <= args.steps <= args.diffusion_steps:
        raise UsageError(f"--steps must lie in [1, {args.diffusion_steps}] (the model's --diffusion_steps)")
    if not 1 <= args.steps <= args.grid_size:
        raise UsageError(f"--steps {args.steps} must lie in [1, --grid_size {args.grid_size}]")
    if not args.output.endswith(".json"):
        raise UsageError(f"--output {args.output} must end in .json (--timestep_respacing reads it by that suffix)")


@cli.script
def main(argv=None):
    args, _ = sample_util.parse_sampling_flags("search_timesteps", argv, __doc__)
    check_flags(args)
    model, base = sample_util.prepare(args, describe_sampler=False)
    device = dist_util.dev()
    indices = range(args.num_samples)
    generators = sample_generators(args.seed, indices, device)
    shape = (args.num_samples, args.image_channels, *image_size_hw(args.image_size))
    x_T = samplers.noise_like(shape, device, generators)
    model_kwargs = {}
    if args.class_cond:
        model_kwargs["y"] = sample_util.batch_labels(args, indices).to(device)
    logger.log(f"searching {args.steps} timesteps for {args.sampler} on {args.num_samples} samples")
    with torch.inference_mode():
        timesteps, errors = search_timesteps(
            base, model, x_T, args.steps, args.sampler, args.grid_size, args.refine_rounds,
            model_kwargs=model_kwargs, clip_denoised=args.clip_denoised, progress=dist_util.get_rank() == 0,
        )
    if dist_util.get_rank() == 0:
        atomic_write_bytes(args.output, (json.dumps(timesteps) + "\n").encode())
        print(f"{'spacing':<10} {'RMS error':>10}")
        for name, error in errors.items():
            print(f"{name:<10} {error:>10.5f}")
        print(f"timesteps: {timesteps}\nwritten to {args.output}", flush=True)
    dist_util.barrier()


if __name__ == "__main__":
    main()
