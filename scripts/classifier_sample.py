"""
Generate samples with classifier guidance (guided-diffusion's
classifier_sample.py): image_sample.py's flags and outputs, plus a noisy
classifier from scripts/classifier_train.py that steers every sample toward
its requested class.

    python scripts/classifier_sample.py --model_path M --classifier_path C --classifier_scale 2 [--flag value ...]

Each sample's class is random from --seed (or --class_label for all) and is
saved as arr_1, whether the diffusion model is class-conditional or not (an
unconditional model draws the classifier's classes). The classifier's flags
come from the flags.json beside --classifier_path (else classifier_defaults(),
the --classifier_* flags override). --classifier_scale 0 loads and checks the
classifier but samples without it. Works with every --sampler, on several
ranks with mpiexec or torchrun.
"""

import blobfile as bf

from improved_diffusion import classifier_util, cli, dist_util, image_output, logger, sample_util
from improved_diffusion import flags as flag_table
from improved_diffusion.errors import InputError, UsageError
from improved_diffusion.flags import NUM_CLASSES
from improved_diffusion.run_flags import FLAGS_FILENAME, read_run_flags
from improved_diffusion.script_util import image_size_hw


def sampling_classifier_flags(args, explicit):
    """
    The create_classifier flags of --classifier_path for classifier_sample.py,
    or None without a classifier. Classifier flags not given on the command
    line come from the flags.json beside the checkpoint (written by
    classifier_train.py), else from classifier_defaults(); the image size,
    channels and class count are the classifier run's (without flags.json:
    the model's size and channels, and NUM_CLASSES).

    :param args: the parsed flags, the model's already filled in from its run.
    :param explicit: the names of the flags given on the command line.
    :raises UsageError: for --classifier_scale without --classifier_path, a
        flags.json of another kind of run, flags that contradict it, and a
        classifier trained on another image size, channel count or noise
        process than the model.
    """
    if not args.classifier_path:
        if "classifier_scale" in explicit:
            raise UsageError(
                "--classifier_scale needs --classifier_path: a classifier checkpoint (modelNNNNNN.pt of a "
                "classifier_train.py run); drop --classifier_scale to sample without classifier guidance"
            )
        return None
    if not isinstance(args.image_size, int):
        raise UsageError(f"--image_size {args.image_size}: classifier guidance takes square images (one size S)")
    flags = {k: getattr(args, k) for k in flag_table.CLASSIFIER[1:]}
    flags.update(image_size=args.image_size, image_channels=args.image_channels, num_classes=NUM_CLASSES)
    saved = read_run_flags(args.classifier_path)
    if saved is not None:
        take_saved_classifier_flags(args, explicit, saved, flags)
    return flags


def take_saved_classifier_flags(args, explicit, saved, flags):
    """Fill `flags` from the classifier run's flags.json `saved`, checking it against the command line and the model."""
    path = args.classifier_path
    flags_path = bf.join(bf.dirname(path), FLAGS_FILENAME)
    if "classifier_width" not in saved:
        raise InputError(
            f"{flags_path} has no classifier flags: {path} is not a classifier trained by classifier_train.py "
            f"(a diffusion model goes in --model_path)"
        )
    conflicts = [
        f"--{k} {getattr(args, k)} (trained with {saved[k]!r})"
        for k in classifier_util.CLASSIFIER_ARCHITECTURE
        if k in saved and k in explicit and getattr(args, k) != saved[k]
    ]
    if conflicts:
        raise InputError(
            f"flags contradict the training run of the classifier {path} (saved in {flags_path}): "
            f"{', '.join(conflicts)}. Drop them: --classifier_path alone rebuilds the classifier."
        )
    flags.update({k: saved[k] for k in classifier_util.CLASSIFIER_ARCHITECTURE if k in saved})
    size = saved.get("image_size", args.image_size)
    if size != args.image_size:
        raise InputError(
            f"the classifier {path} was trained on {size}x{size} images, the model {args.model_path} makes "
            f"{args.image_size}x{args.image_size}: use a classifier trained with classifier_train.py "
            f"--image_size {args.image_size}"
        )
    channels = saved.get("image_channels", 3)
    if channels != args.image_channels:
        raise InputError(
            f"the classifier {path} reads {channels}-channel images, the model {args.model_path} makes "
            f"{args.image_channels}-channel ones: use a classifier trained with classifier_train.py "
            f"--image_channels {args.image_channels}"
        )
    noise = [
        f"--{k} {saved[k]!r} (the model's: {getattr(args, k)!r})"
        for k in flag_table.NOISE_LEVEL
        if k in saved and saved[k] != getattr(args, k)
    ]
    if noise:
        raise InputError(
            f"the classifier {path} was trained on another noise process than the model {args.model_path}: "
            f"{', '.join(noise)}; its timesteps would mean other noise levels. Train the classifier with the "
            f"model's diffusion flags"
        )
    flags["num_classes"] = saved.get("num_classes", NUM_CLASSES)


def resolve_num_classes(args, classifier_flags):
    """
    Set args.num_classes, the classes the labels are drawn from: a
    class-conditional model's own (its flags.json, else --num_classes, else
    NUM_CLASSES), else --num_classes, else the classifier's; it must be the
    classifier's class count.
    """
    classifier_classes = None if classifier_flags is None else classifier_flags["num_classes"]
    if args.num_classes < -1 or args.num_classes == 0:
        raise UsageError(f"--num_classes {args.num_classes} must be a positive number of classes")
    if args.class_cond:
        saved = (args.saved_flags or {}).get("num_classes")
        if saved is not None and args.num_classes not in (-1, saved):
            raise InputError(
                f"--num_classes {args.num_classes} contradicts the training run of {args.model_path} "
                f"(trained with {saved}): drop it"
            )
        args.num_classes = saved or (args.num_classes if args.num_classes > 0 else NUM_CLASSES)
        if classifier_classes not in (None, args.num_classes):
            raise InputError(
                f"the classifier {args.classifier_path} has {classifier_classes} classes, the class-conditional "
                f"model {args.model_path} has {args.num_classes}: guide it with a classifier of its classes "
                f"(classifier_train.py --num_classes {args.num_classes} on the same data)"
            )
    elif args.num_classes == -1:
        if classifier_classes is None:
            raise UsageError(
                "an unconditional model without --classifier_path has no classes to request: give "
                "--classifier_path, or --num_classes N for the labels saved as arr_1"
            )
        args.num_classes = classifier_classes
    elif classifier_classes not in (None, args.num_classes):
        raise InputError(
            f"the classifier {args.classifier_path} has {classifier_classes} classes but --num_classes is "
            f"{args.num_classes}: drop --num_classes (an unconditional model takes the classifier's classes)"
        )


def check_class_label(args):
    """--class_label (-1: random) must name one of the classes."""
    if args.class_label >= args.num_classes:
        raise UsageError(f"--class_label {args.class_label} is not below the {args.num_classes} classes")


def without_labels(model):
    """An unconditional `model` as a function that takes (and ignores) the labels y that cond_fn reads."""

    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)

    return model_fn


@cli.script
def main(argv=None):
    # num_classes is resolved by resolve_num_classes: an unconditional model's saved count means nothing.
    args, explicit = sample_util.parse_sampling_flags("classifier_sample", argv, __doc__,
                                                      run_flags_except=("num_classes",))
    sample_util.require_ddpm(args, "guidance by a classifier of classifier_train.py (trained on DDPM timesteps)")
    classifier_flags = sampling_classifier_flags(args, explicit)
    resolve_num_classes(args, classifier_flags)
    check_class_label(args)
    cond_fn = None
    if classifier_flags is not None:
        dist_util.setup_dist()
        classifier = classifier_util.load_classifier(args.classifier_path, classifier_flags)
        if args.classifier_scale != 0:
            cond_fn = classifier_util.classifier_cond_fn(classifier, args.classifier_scale)
    model, diffusion = sample_util.prepare(args)
    if cond_fn is not None:
        logger.log(f"classifier guidance at scale {args.classifier_scale} with {args.classifier_path} "
                   f"({args.num_classes} classes)")
    elif classifier_flags is not None:
        logger.log(f"classifier {args.classifier_path} loaded and checked, not evaluated at --classifier_scale 0")
    model_fn = model if args.class_cond else without_labels(model)
    shape = (args.image_channels, *image_size_hw(args.image_size))

    def draw_batch(indices):
        labels = sample_util.batch_labels(args, indices)
        model_kwargs = {"y": labels.to(dist_util.dev())}
        sample = sample_util.run_sampler(diffusion, model_fn, args, indices, shape, model_kwargs, cond_fn=cond_fn)
        return {"images": image_output.to_uint8_images(sample), "labels": labels.numpy()}

    sample_util.sample_and_save(args.num_samples, args.batch_size, draw_batch, args.save_pngs, args.sample_name)


if __name__ == "__main__":
    main()
