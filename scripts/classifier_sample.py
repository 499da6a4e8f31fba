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

from improved_diffusion import classifier_util, dist_util, logger, sample_util
from improved_diffusion.sample_util import UsageError
from improved_diffusion.script_util import NUM_CLASSES, create_model_and_diffusion, model_and_diffusion_defaults

MODEL_KEYS = list(model_and_diffusion_defaults())


def flag_defaults():
    """Every flag of the script with its default (classifier flags, then model flags, last)."""
    defaults = {**sample_util.IMAGE_SAMPLING_FLAGS, **classifier_util.CLASSIFIER_SAMPLING_FLAGS,
                **model_and_diffusion_defaults()}
    # -1: a class-conditional model's own count, else the classifier's.
    defaults["num_classes"] = -1
    return defaults


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
            raise UsageError(
                f"--num_classes {args.num_classes} contradicts the training run of {args.model_path} "
                f"(trained with {saved}): drop it"
            )
        args.num_classes = saved or (args.num_classes if args.num_classes > 0 else NUM_CLASSES)
        if classifier_classes not in (None, args.num_classes):
            raise UsageError(
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
        raise UsageError(
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


def main(argv=None):
    defaults = flag_defaults()
    _, explicit = sample_util.parse_flags(defaults, argv, __doc__)
    # num_classes is resolved here: an unconditional model's saved count means nothing.
    parse_keys = [k for k in MODEL_KEYS if k != "num_classes"]
    args = sample_util.parse_sampling_flags(defaults, parse_keys, argv, description=__doc__)
    classifier_flags = classifier_util.sampling_classifier_flags(args, explicit)
    resolve_num_classes(args, classifier_flags)
    check_class_label(args)
    cond_fn = None
    if classifier_flags is not None:
        dist_util.setup_dist()
        classifier = classifier_util.load_classifier(args.classifier_path, classifier_flags)
        if args.classifier_scale != 0:
            cond_fn = classifier_util.classifier_cond_fn(classifier, args.classifier_scale)
    model, diffusion = sample_util.prepare(args, create_model_and_diffusion, MODEL_KEYS)
    if cond_fn is not None:
        logger.log(f"classifier guidance at scale {args.classifier_scale} with {args.classifier_path} "
                   f"({args.num_classes} classes)")
    elif classifier_flags is not None:
        logger.log(f"classifier {args.classifier_path} loaded and checked, not evaluated at --classifier_scale 0")
    model_fn = model if args.class_cond else without_labels(model)
    shape = (args.image_channels, args.image_size, args.image_size)

    def draw_batch(indices):
        labels = sample_util.batch_labels(args, indices)
        model_kwargs = {"y": labels.to(dist_util.dev())}
        sample = sample_util.run_sampler(diffusion, model_fn, args, indices, shape, model_kwargs, cond_fn=cond_fn)
        return {"images": sample_util.to_uint8_images(sample), "labels": labels.numpy()}

    sample_util.sample_and_save(args, draw_batch)


if __name__ == "__main__":
    sample_util.run_script(main)
