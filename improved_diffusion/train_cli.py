"""
The training scripts' flags turned into a run (image_train.py,
super_res_train.py, classifier_train.py): one run setup for all of them
(`start_run`: the checks against a checkpoint being resumed, the process
group, the logger, flags.json and the seeds), then the model, the data and
the loop, built from the parsed flags with explicit arguments.

Exit status (see cli.script): 0 when training ends or stops after SIGTERM
(the checkpoint set of the last step is saved first); 130 after SIGINT (also
saved); 2 with one "error: ..." line for flags that cannot work; 1 with one
"error: ..." line, from every rank, for bad data or checkpoint files and
too many non-finite steps.
"""

import signal

import blobfile as bf
import torch

from . import dist_util, logger, samplers
from . import flags as flag_table
from .checkpointing import check_save_format, resolve_resume
from .classifier_util import ClassifierTrainLoop
from .errors import InputError, UsageError
from .evaluation import TrainingEvaluator
from .image_datasets import load_data
from .progress import TrainingProgress
from .resample import create_named_schedule_sampler
from .run_flags import FLAGS_FILENAME, read_run_flags, write_run_flags
from .script_util import create_classifier, diffusion_from_flags, image_size_hw, model_from_flags
from .train_core import check_update_options, get_blob_logdir, parse_ema_stds
from .train_state import seed_everything
from .train_util import TrainLoop, check_eval_interval


def exit_status(loop):
    """The exit status of a finished loop: 128 + SIGINT after Ctrl-C, else 0."""
    return 128 + signal.SIGINT if loop.stop_signal == signal.SIGINT else 0


def start_run(script, args):
    """
    What every training script does before building anything: set up the
    process group and the logger, check the flags against the run being
    resumed (an architecture or process flag that differs from the
    checkpoint's run is an InputError naming it, before flags.json is
    overwritten), write flags.json and seed the global generators.
    """
    dist_util.setup_dist()
    logger.configure()
    check_resume_flags(script, args)
    if dist_util.get_rank() == 0:
        write_run_flags(logger.get_dir(), vars(args))
    seed_everything(args.seed)


def check_core_flags(args):
    """
    UsageError naming the flag for training-core options that cannot work:
    --ema_std, the update's options, --save_format, and --init_checkpoint
    with --resume_checkpoint (only "auto" may go with it: the run resumes
    when its folder has a complete set, and starts from the weights otherwise).
    """
    try:
        parse_ema_stds(args.ema_std)
    except ValueError as exc:
        raise UsageError(f"--ema_std {args.ema_std}: {exc}") from None
    try:
        check_update_options(grad_clip=args.grad_clip, lr_warmup_steps=args.lr_warmup_steps,
                             ema_snapshot_interval=args.ema_snapshot_interval)
        check_save_format(args.save_format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.init_checkpoint and args.resume_checkpoint not in ("", "auto"):
        raise UsageError(
            f"--init_checkpoint {args.init_checkpoint} and --resume_checkpoint {args.resume_checkpoint} exclude "
            "each other: --resume_checkpoint continues a run of this library exactly, --init_checkpoint starts a "
            "new one from other weights; give one (or --resume_checkpoint auto, which resumes this run's folder "
            "when it has a complete set)"
        )


def core_options(args):
    """The keyword arguments of train_core.TrainingCore that every training script's flags give."""
    return dict(
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        seed=args.seed,
        keep_checkpoints=args.keep_checkpoints,
        allow_partial_resume=args.allow_partial_resume,
        run_flags=vars(args),
        progress=TrainingProgress(enabled=dist_util.get_rank() == 0),
        ema_std=args.ema_std,
        ema_snapshot_interval=args.ema_snapshot_interval,
        grad_clip=args.grad_clip,
        lr_warmup_steps=args.lr_warmup_steps,
        save_format=args.save_format,
        init_checkpoint=args.init_checkpoint,
    )


def check_resume_flags(script, args):
    """InputError naming each architecture or process flag of `args` that the resumed run had otherwise."""
    if not args.resume_checkpoint:
        return
    model_path = resolve_resume(args.resume_checkpoint, get_blob_logdir())
    saved = read_run_flags(model_path) if model_path else None
    if saved is None:
        return
    names = [flag.name for flag in flag_table.script_flags(script)]
    conflicts = flag_table.contradictions(vars(args), saved, names)
    if conflicts:
        raise InputError(
            f"--resume_checkpoint {args.resume_checkpoint}: its run was trained with other flags "
            f"({bf.join(bf.dirname(model_path), FLAGS_FILENAME)}): {', '.join(conflicts)}. Give the run's flags "
            "to continue it, or start a new run in another folder"
        )


def resolve_null_label(args, explicit):
    """--class_dropout_prob > 0 trains the null label: it implies --null_label True unless that was refused."""
    if args.class_dropout_prob > 0 and not args.null_label:
        if "null_label" in explicit:
            raise UsageError(
                f"--class_dropout_prob {args.class_dropout_prob} trains the null label, which --null_label False "
                "leaves out: drop --null_label False"
            )
        args.null_label = True


def build(factory, *arguments):
    """factory(*arguments), its ValueError (flags that cannot work) as a UsageError."""
    try:
        return factory(*arguments)
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def read_data(**kwargs):
    """load_data(**kwargs), its ValueError (an empty folder, an undecodable file) as an InputError."""
    try:
        return load_data(**kwargs)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def training_data(args, image_size):
    """load_data over --data_dir with the training flags, images of `image_size` (S, "H,W" or (H, W))."""
    return read_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=image_size_hw(image_size),
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        random_crop=args.random_crop,
        seed=args.seed,
        num_workers=args.num_workers,
        allow_mixed_channels=args.allow_mixed_channels,
        image_channels=args.image_channels,
    )


def train_diffusion(script, args, explicit, make_data):
    """
    image_train.py's and super_res_train.py's run: check the flags (those
    that do not apply to --objective are errors; the evaluation's sampler
    and nodes default to the objective's), start the run, build the model,
    the noise process and the data, and train.

    :param script: the key of improved_diffusion.flags.SCRIPTS.
    :param make_data: args -> the data iterator.
    :return: the finished TrainLoop.
    """
    if not args.data_dir:
        raise UsageError("--data_dir is required: a folder of training images")
    flag_table.check_objective(args.objective, explicit)
    flag_table.apply_objective_defaults(vars(args), explicit, args.objective)
    check_core_flags(args)
    resolve_null_label(args, explicit)
    flags = vars(args)
    with torch.device("meta"):  # flags that build no model fail before any work, without allocating it
        build(model_from_flags, flags)
    diffusion = build(diffusion_from_flags, flags)
    eval_process = check_evaluation_flags(args, super_res="large_size" in flags) if args.eval_interval else None
    start_run(script, args)
    logger.log("creating model and diffusion...")
    model = model_from_flags(flags).to(dist_util.dev())
    evaluator = make_evaluator(args, eval_process) if args.eval_interval else None
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    logger.log("creating data loader...")
    data = make_data(args)
    logger.log("training...")
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        ema_rate=args.ema_rate,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        lr_anneal_steps=args.lr_anneal_steps,
        use_bf16=args.use_bf16,
        max_steps=args.max_steps,
        max_bad_steps=args.max_bad_steps,
        check_replicas=args.check_replicas,
        evaluator=evaluator,
        eval_interval=args.eval_interval,
        class_dropout_prob=args.class_dropout_prob,
        **core_options(args),
    )
    loop.run_loop()
    return loop


def check_evaluation_flags(args, super_res):
    """
    The --eval_* flags must work: an image model, an interval that lands on
    log rows, a known sampler, nodes the run's process can walk. Returns the
    noise process of the evaluation samples: the run's, over --eval_timestep_respacing.
    """
    if super_res:
        raise UsageError("--eval_interval applies to image_train.py; super-resolution runs cannot be scored alone")
    try:
        check_eval_interval(args.eval_interval, args.log_interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.eval_sampler not in samplers.SAMPLERS:
        known = ", ".join(samplers.SAMPLERS)
        raise UsageError(f"unknown --eval_sampler {args.eval_sampler!r}; known samplers: {known}")
    try:
        return diffusion_from_flags(dict(vars(args), timestep_respacing=args.eval_timestep_respacing))
    except ValueError as exc:
        raise UsageError(f"--eval_timestep_respacing {args.eval_timestep_respacing}: {exc}") from None


def make_evaluator(args, diffusion):
    """
    The TrainingEvaluator of --eval_interval: --eval_num_samples samples with
    --eval_sampler from `diffusion` (check_evaluation_flags'), against --data_dir.
    """
    logger.log("computing the training data's statistics for --eval_interval...")
    return TrainingEvaluator(
        diffusion=diffusion,
        data_dir=args.data_dir,
        image_size=image_size_hw(args.image_size),
        num_samples=args.eval_num_samples,
        batch_size=args.batch_size,
        log_dir=logger.get_dir(),
        sampler=args.eval_sampler,
        num_classes=args.num_classes if args.class_cond else 0,
        seed=args.seed,
        weights_path=args.inception_weights,
        image_channels=args.image_channels,
    )


# ---------------------------------------------------------------- classifier training


def check_classifier_flags(args):
    """UsageError naming the flag for values classifier_train.py cannot train with."""
    if not args.data_dir:
        raise UsageError("--data_dir is required: a folder of training images named CLASS_*.png (CLASS: the label)")
    for flag in ("iterations", "log_interval", "eval_interval", "save_interval", "num_classes", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if not isinstance(args.image_size, int):
        raise UsageError(f"--image_size {args.image_size}: the classifier takes square images, give one size S")
    if args.classifier_use_fp16:
        raise UsageError(
            "--classifier_use_fp16 True: classifier_train.py trains in float32 (guided-diffusion's float16 "
            "training is not implemented); drop the flag (classifier_sample.py takes it on CUDA)"
        )


def train_classifier(args):
    """
    classifier_train.py's run: check the flags, start the run, build the
    classifier, the diffusion and the data, and train.

    :return: the finished ClassifierTrainLoop.
    """
    check_classifier_flags(args)
    check_core_flags(args)
    classifier_flags = [args.image_size, args.classifier_use_fp16, args.classifier_width, args.classifier_depth,
                        args.classifier_attention_resolutions, args.classifier_use_scale_shift_norm,
                        args.classifier_resblock_updown, args.classifier_pool, args.num_classes, args.image_channels]
    with torch.device("meta"):
        build(create_classifier, *classifier_flags)
    diffusion = build(diffusion_from_flags, vars(args))
    start_run("classifier_train", args)
    logger.log("creating the classifier and diffusion...")
    model = create_classifier(*classifier_flags).to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    logger.log("creating the data loaders...")
    data = labeled_data(args.data_dir, args)
    val_data = labeled_data(args.val_data_dir, args) if args.val_data_dir else None
    check_classes(args, data, val_data)
    logger.log("training the classifier...")
    loop = ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        iterations=args.iterations,
        eval_interval=args.eval_interval,
        noised=args.noised,
        schedule_sampler=schedule_sampler,
        anneal_lr=args.anneal_lr,
        **core_options(args),
    )
    loop.run_loop()
    return loop


def labeled_data(folder, args):
    """load_data over `folder` with labels from the file names, images of --image_size."""
    return read_data(data_dir=folder, batch_size=args.batch_size, image_size=args.image_size, class_cond=True,
                     seed=args.seed, image_channels=args.image_channels)


def check_classes(args, data, val_data):
    """The training classes must fit --num_classes, and the validation folder must have the same ones."""
    names = data.class_names
    if len(names) > args.num_classes:
        raise InputError(
            f"--data_dir {args.data_dir} has {len(names)} classes ({_some(names)}), more than "
            f"--num_classes {args.num_classes}: pass --num_classes {len(names)}"
        )
    if val_data is not None and val_data.class_names != names:
        raise InputError(
            f"--val_data_dir {args.val_data_dir} has the classes {_some(val_data.class_names)}, --data_dir "
            f"{args.data_dir} has {_some(names)}: labels are numbered by sorted class name, so both folders "
            f"need the same classes"
        )
    if len(names) < args.num_classes:
        logger.log(f"note: {len(names)} classes in --data_dir; the classifier has --num_classes {args.num_classes}")


def _some(names, shown=5):
    """'a, b, c' (the first `shown` names, then '...')."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
