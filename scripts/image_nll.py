"""
Estimate the negative log-likelihood of images (bits per dimension) under a
model with the full variational bound. Logs the running mean over
--num_samples images of --data_dir and writes the per-timestep terms to
terms_{N}x{T}.npz in the log directory: vb, mse, xstart_mse ([N x T], column t
for timestep t), prior_bpd and total_bpd ([N]).
"""

import math

import blobfile as bf
import numpy as np
import torch
import torch.distributed as dist

from improved_diffusion import cli, dist_util, image_output, logger, sample_util, sharding
from improved_diffusion.errors import UsageError
from improved_diffusion.sample_seeds import sample_generators
from improved_diffusion.script_util import image_size_hw
from improved_diffusion.train_cli import read_data

TERMS = ("vb", "mse", "xstart_mse", "prior_bpd", "total_bpd")


def evaluate(model, diffusion, data, args):
    """
    Run calc_bpd_loop over this rank's share of --num_samples images (rank r
    evaluates images r, r + W, r + 2W, ... of W ranks), logging the running
    mean over all ranks after each round of batches.

    :return: list of dicts of NumPy arrays: the TERMS plus "index" ([n]), one per batch.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = sharding.chunks(range(rank, args.num_samples, world_size), args.batch_size)
    rounds = math.ceil(len(range(0, args.num_samples, world_size)) / args.batch_size)
    batches += [range(0)] * (rounds - len(batches))
    totals = torch.zeros(2, dtype=torch.float64, device=dist_util.dev())
    parts = []
    for indices in batches:
        local = torch.zeros(2, dtype=torch.float64, device=dist_util.dev())
        if len(indices):
            parts.append(evaluate_batch(model, diffusion, data, args, indices))
            local += torch.tensor([parts[-1]["total_bpd"].sum(), len(indices)], device=local.device)
        dist.all_reduce(local)
        totals += local
        logger.log(f"{int(totals[1])} of {args.num_samples} images: {totals[0] / totals[1]:.4f} bits/dim")
    return parts


def evaluate_batch(model, diffusion, data, args, indices):
    """The TERMS and "index" of the next len(indices) images of `data`, as NumPy arrays."""
    images, cond = next(data)
    model_kwargs = {key: value[: len(indices)].to(dist_util.dev()) for key, value in cond.items()}
    x_start = images[: len(indices)].to(dist_util.dev())
    generators = sample_generators(args.seed, indices, dist_util.dev())
    with torch.inference_mode():
        terms = diffusion.calc_bpd_loop(
            model, x_start, clip_denoised=args.clip_denoised, model_kwargs=model_kwargs, generator=generators
        )
    out = {key: terms[key].float().cpu().numpy() for key in TERMS}
    out["index"] = np.array(indices)
    return out


@cli.script
def main(argv=None):
    args, _ = sample_util.parse_sampling_flags("image_nll", argv, __doc__)
    sample_util.require_ddpm(args, "the variational bound in bits/dim")
    if not args.data_dir:
        raise UsageError("--data_dir is required: a folder of images to evaluate")
    model, diffusion = sample_util.prepare(args, describe_sampler=False)
    data = read_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=image_size_hw(args.image_size),
                     class_cond=args.class_cond, deterministic=True, image_channels=args.image_channels)
    result = sharding.gather_parts(evaluate(model, diffusion, data, args))
    if result is not None:
        order = np.argsort(result.pop("index"), kind="stable")
        terms = {key: value[order] for key, value in result.items()}
        path = bf.join(logger.get_dir(), "terms_" + "x".join(str(d) for d in terms["vb"].shape) + ".npz")
        image_output.write_npz(path, **terms)
        logger.log(f"mean {terms['total_bpd'].mean():.4f} bits/dim over {len(order)} images")
        print(f"terms: {path}", flush=True)
    dist_util.barrier()


if __name__ == "__main__":
    main()
