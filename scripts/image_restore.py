"""
Restore images with a trained model, without retraining (SPEC 19): each input
image x is measured as y = A(x) (+ noise of --sigma_y) by the --task's
operator (inpaint with --mask, super_res by --super_res_factor, deblur by a
Gaussian of --blur_sigma and --blur_size, colorize), and --method (sdedit,
replace, repaint, ddnm, dps) restores --num_samples_per_input images from y
with --sampler over --timestep_respacing. sdedit without --task edits the
input itself (the guide is x).

Writes, in $OPENAI_LOGDIR, restored_{N}x{H}x{W}x{C}.npz (arr_0 uint8, the
restorations of each input in turn; arr_1 the labels of a class-conditional
model) and a PNG grid beside it whose rows show the input, the measurement
and the restorations; prints ||A(x) - y|| of every restoration.
"""

import blobfile as bf
import numpy as np
import torch

from improved_diffusion import cli, dist_util, image_output, logger, operators, restoration, restoration_inputs
from improved_diffusion import sample_util
from improved_diffusion.errors import UsageError
from improved_diffusion.sample_seeds import sample_generators, shared_seed
from improved_diffusion.script_util import image_size_hw
from improved_diffusion.sharding import sample_in_shards, spool_folder

TASKS = ("inpaint", "super_res", "deblur", "colorize")
MEASUREMENT_STREAM = 2  # sample_seeds' streams 0 and 1 are the noise and the labels
GRID_ROWS = 16
GRID_RESTORATIONS = 8


def check_flags(args):
    """The flags of the restoration itself, before any work."""
    if not args.input:
        raise UsageError("--input is required: an npz (arr_0 uint8 [N x H x W x C]) or a folder of PNGs to restore")
    if args.task not in TASKS and not (args.task == "" and args.method == "sdedit"):
        raise UsageError(
            f"--task {args.task!r}: give one of {', '.join(TASKS)} (only --method sdedit runs without one)"
        )
    if args.task == "inpaint" and not args.mask:
        raise UsageError(f"--task inpaint needs --mask: a PNG, an npz, or one of {', '.join(operators.MASK_KINDS)}")
    if args.mask and args.task != "inpaint":
        raise UsageError(f"--mask applies to --task inpaint, not {args.task or 'sdedit without a task'}: drop it")
    if args.method == "sdedit":
        try:
            restoration.sdedit_start(1, args.t_start)
        except ValueError as exc:
            raise UsageError(f"--t_start {args.t_start} must lie in (0, 1] (1: from pure noise)") from exc
    if args.dps_scale <= 0:
        raise UsageError(f"--dps_scale {args.dps_scale} must be > 0: it is the step size of DPS's gradient step")
    if args.jump_length < 1 or args.jump_n_sample < 1:
        raise UsageError("--jump_length and --jump_n_sample must be at least 1 (RePaint's setting: 10 and 10)")
    if args.sigma_y < 0:
        raise UsageError(f"--sigma_y {args.sigma_y} must be >= 0")


def make_operator(args, mask):
    """The operator of --task (None for sdedit without a task); a UsageError where the flags build none."""
    try:
        if args.task == "inpaint":
            return operators.Inpaint(mask, sigma_y=args.sigma_y)
        if args.task == "super_res":
            return operators.SuperRes(args.super_res_factor, sigma_y=args.sigma_y)
        if args.task == "deblur":
            return operators.Deblur(args.blur_sigma, args.blur_size, sigma_y=args.sigma_y)
        if args.task == "colorize":
            return operators.Colorize(args.image_channels, sigma_y=args.sigma_y)
    except ValueError as exc:
        raise UsageError(f"--task {args.task}: {exc}") from exc
    return None


def method_args(args):
    """The keyword arguments of restoration.restore for --method."""
    return {
        "sdedit": {"t_start": args.t_start},
        "repaint": {"jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample},
        "dps": {"scale": args.dps_scale},
    }.get(args.method, {})


def check_operator(args, operator, num_images, height, width):
    """
    The method, sampler and operator fit each other and the model's images
    (UsageErrors naming the fix); num_images: the inputs (a per-image mask has one each).
    """
    try:
        restoration.check_method(args.method, args.sampler, operator)
        if operator is not None:
            operator.check_shape((num_images, args.image_channels, height, width))
    except ValueError as exc:
        raise UsageError(f"--method {args.method} --task {args.task}: {exc}") from exc


def save_outputs(result, per_input, name):
    """Write the npz and the grid of (input, measurement, restorations) rows on rank 0; print the errors."""
    images = result["images"]
    arrays = {"arr_0": images, "arr_1": result["labels"]} if "labels" in result else {"arr_0": images}
    stem = bf.join(logger.get_dir(), f"{name}_" + "x".join(str(d) for d in images.shape))
    image_output.write_npz(stem + ".npz", **arrays)
    columns = 2 + min(per_input, GRID_RESTORATIONS)
    rows = []
    for first in range(0, min(GRID_ROWS * per_input, len(images)), per_input):
        rows += [result["inputs"][first], result["measurements"][first], *images[first : first + columns - 2]]
    grid = image_output.image_grid(image_output.enlarge(np.stack(rows), image_output.GRID_MIN_SIDE), columns=columns)
    image_output.write_png(stem + "_grid.png", grid)
    for index, error in enumerate(result["errors"]):
        line = f"input {index // per_input} restoration {index % per_input}: ||A(x) - y|| = {error:.4g}"
        logger.log(line)
        print(line)
    print(f"mean ||A(x) - y|| = {result['errors'].mean():.4g} over {len(images)} restorations")
    print(f"restorations: {stem}.npz\ngrid: {stem}_grid.png", flush=True)


@cli.script
def main(argv=None):
    args, _ = sample_util.parse_sampling_flags("image_restore", argv, __doc__)
    check_flags(args)
    height, width = image_size_hw(args.image_size)
    dist_util.setup_dist()
    args.seed = shared_seed(args.seed)
    images, labels = restoration_inputs.read_images(args.input)
    restoration_inputs.check_images(images, args.input, height, width, args.image_channels)
    mask = None
    if args.mask in operators.MASK_KINDS:
        mask = operators.make_mask(args.mask, height, width, seed=args.seed)
    elif args.mask:
        mask = restoration_inputs.read_mask(args.mask, height, width, args.image_channels, len(images))
    operator = make_operator(args, mask)
    check_operator(args, operator, len(images), height, width)
    model, diffusion = sample_util.prepare(args, describe_sampler=False)
    num_steps = diffusion.sampling_nodes().num_steps
    evaluations = restoration.model_evaluations(args.method, args.sampler, num_steps, **method_args(args))
    logger.log(f"{args.method} with the {args.sampler} sampler over {num_steps} steps: {evaluations} model "
               f"evaluations per restoration; task {args.task or 'none'}, sigma_y {args.sigma_y}")
    per_input = args.num_samples_per_input
    device = dist_util.dev()

    def draw_batch(indices):
        sources = [index // per_input for index in indices]
        x = image_output.from_uint8_images(images[sources], device)
        batch_operator = operator
        if mask is not None and mask.ndim == 4:
            batch_operator = operators.Inpaint(mask[sources], sigma_y=args.sigma_y)
        measurement_noise = sample_generators(args.seed, sources, device, stream=MEASUREMENT_STREAM)
        y = x if batch_operator is None else batch_operator.measure(x, generator=measurement_noise)
        out = {"inputs": images[sources]}
        model_kwargs = {}
        if args.class_cond:
            if labels is not None and args.class_label < 0:
                classes = torch.from_numpy(labels[sources])
            else:
                classes = sample_util.batch_labels(args, sources)
            model_kwargs["y"] = classes.to(device)
            out["labels"] = classes.numpy()
        restored = restoration.restore(
            diffusion, model, y, batch_operator, method=args.method, sampler=args.sampler,
            generator=sample_generators(args.seed, indices, device), model_kwargs=model_kwargs,
            clip_denoised=args.clip_denoised, eta=args.eta, **method_args(args),
        )
        measured = restored if batch_operator is None else batch_operator(restored)
        shown = y if batch_operator is None else batch_operator.as_image(y)
        out["errors"] = (measured - y).flatten(1).norm(dim=1).cpu().numpy()
        out["images"] = image_output.to_uint8_images(restored)
        out["measurements"] = image_output.to_uint8_images(shown)
        return out

    with spool_folder() as folder:
        result = sample_in_shards(len(images) * per_input, args.batch_size, draw_batch, folder, desc="restoring")
        if result is not None:
            save_outputs(result, per_input, args.sample_name or "restored")
    dist_util.barrier()


if __name__ == "__main__":
    main()
