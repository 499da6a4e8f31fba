"""
Upsample the images of an npz (--base_samples, e.g. the output of
image_sample.py: arr_0 uint8 [M x small x small x 3], arr_1 labels optional)
with a super-resolution model. Sample i upsamples base image i (modulo M) and,
when the model is class-conditional, is conditioned on its label. Writes
samples_{N}x{large}x{large}x{C}.npz (with arr_1 labels when the base samples have
them) and a PNG grid; --seed, --batch_size and ranks behave as in image_sample.py.
"""

import io

import blobfile as bf
import numpy as np
import torch

from improved_diffusion import cli, dist_util, image_output, logger, sample_util
from improved_diffusion.errors import InputError, UsageError


def load_base_samples(args):
    """
    Read and check --base_samples.

    :return: (images uint8 [M x small_size x small_size x C], labels int [M] or None).
    """
    if not args.base_samples:
        raise UsageError("--base_samples is required: an npz of low-resolution images (arr_0)")
    if not bf.exists(args.base_samples):
        raise InputError(f"--base_samples {args.base_samples} does not exist")
    try:
        with bf.BlobFile(args.base_samples, "rb") as f:
            data = np.load(io.BytesIO(f.read()))
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise InputError(
            f"--base_samples {args.base_samples} is not an npz with arr_0 ({type(exc).__name__}: {exc})"
        ) from None
    expected = (args.small_size, args.small_size, args.image_channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected or len(images) == 0:
        raise InputError(
            f"--base_samples {args.base_samples}: arr_0 is {images.dtype} {list(images.shape)}, expected "
            f"uint8 [M x {args.small_size} x {args.small_size} x {args.image_channels}] (fix --small_size, "
            "--image_channels or the file)"
        )
    if args.class_cond and labels is None:
        raise InputError(
            f"the model is class-conditional but --base_samples {args.base_samples} has no labels (arr_1)"
        )
    return images, labels


@cli.script
def main(argv=None):
    args, _ = sample_util.parse_sampling_flags("super_res_sample", argv, __doc__)
    base_images, base_labels = load_base_samples(args)
    model, diffusion = sample_util.prepare(args, super_res=True)
    if args.num_samples > len(base_images):
        logger.log(f"{args.num_samples} samples from {len(base_images)} base images: reusing them in order")
    shape = (args.image_channels, args.large_size, args.large_size)

    def draw_batch(indices):
        base = np.array(indices) % len(base_images)
        model_kwargs = {"low_res": image_output.from_uint8_images(base_images[base], dist_util.dev())}
        out = {}
        if base_labels is not None:
            out["labels"] = base_labels[base]
            if args.class_cond:
                model_kwargs["y"] = torch.from_numpy(out["labels"]).long().to(dist_util.dev())
        sample = sample_util.run_sampler(diffusion, model, args, indices, shape, model_kwargs)
        out["images"] = image_output.to_uint8_images(sample)
        return out

    sample_util.sample_and_save(args.num_samples, args.batch_size, draw_batch, args.save_pngs, args.sample_name,
                                desc="upsampling")


if __name__ == "__main__":
    main()
