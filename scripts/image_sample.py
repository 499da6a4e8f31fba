"""
Generate a large batch of image samples from a model (with --sampler, any sampler of
improved_diffusion/samplers.py; by default the model's objective's own: DDPM, or DDIM with --use_ddim
True, for the DDPM family, Heun over karras18 for EDM, Euler over uniform50 for flow) and save them as one
npz (arr_0: uint8 [N x H x W x C] with C = --image_channels, arr_1: class labels when the model is
class-conditional), a PNG grid beside it and, with --save_pngs, one PNG per
sample. Run on several ranks with mpiexec or torchrun; the output depends only
on --seed, not on --batch_size or the number of ranks.
"""

from improved_diffusion import cli, dist_util, image_output, sample_util
from improved_diffusion.errors import UsageError
from improved_diffusion.script_util import image_size_hw


def check_class_label(args):
    """--class_label (-1: random) must name a class of a class-conditional model."""
    if args.class_label < 0:
        return
    if not args.class_cond:
        raise UsageError("--class_label needs a class-conditional model (--class_cond True)")
    if args.class_label >= args.num_classes:
        raise UsageError(f"--class_label {args.class_label} is not below --num_classes {args.num_classes}")


@cli.script
def main(argv=None):
    args, _ = sample_util.parse_sampling_flags("image_sample", argv, __doc__)
    check_class_label(args)
    model, diffusion = sample_util.prepare(args)
    shape = (args.image_channels, *image_size_hw(args.image_size))

    def draw_batch(indices):
        out = {}
        model_kwargs = {}
        if args.class_cond:
            labels = sample_util.batch_labels(args, indices)
            model_kwargs["y"] = labels.to(dist_util.dev())
            out["labels"] = labels.numpy()
        sample = sample_util.run_sampler(diffusion, model, args, indices, shape, model_kwargs)
        out["images"] = image_output.to_uint8_images(sample)
        return out

    sample_util.sample_and_save(args.num_samples, args.batch_size, draw_batch, args.save_pngs, args.sample_name)


if __name__ == "__main__":
    main()
