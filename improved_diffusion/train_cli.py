"""
What the training scripts (image_train.py, super_res_train.py) share: the
training flags, the setup of processes, logger and seeds, and a clean exit.

Exit status: 0 when training ends or stops after SIGTERM (the checkpoint set
of the last step is saved first); 130 after SIGINT (also saved); 1 with a
one-line "error: ..." on stderr, from every rank, for a user error (bad
flags, data or checkpoint files, too many non-finite steps).
"""

import argparse
import signal
import sys

from . import dist_util, logger, samplers
from .evaluation import TrainingEvaluator
from .image_datasets import load_data
from .progress import TrainingProgress
from .resample import create_named_schedule_sampler
from .run_flags import write_run_flags
from .script_util import _diffusion_from_flags, add_dict_to_argparser, args_to_dict
from .train_state import seed_everything
from .train_util import TrainingError, TrainLoop, check_eval_interval


def training_defaults():
    """The training flags and their defaults (the reference's, then the new ones)."""
    return {
        "data_dir": "",
        "schedule_sampler": "uniform",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "lr_anneal_steps": 0,
        "batch_size": 1,
        "microbatch": -1,
        "ema_rate": "0.9999",
        "log_interval": 10,
        "save_interval": 10000,
        "resume_checkpoint": "",
        "use_fp16": False,
        "fp16_scale_growth": 1e-3,
        "seed": 0,
        "max_steps": 0,
        "use_bf16": False,
        "random_flip": False,
        "keep_checkpoints": 0,
        "max_bad_steps": 20,
        "allow_partial_resume": False,
        "check_replicas": False,
        "num_workers": 1,
        "allow_mixed_channels": False,
        "eval_interval": 0,
        "eval_num_samples": 1000,
        "eval_sampler": "ddim",
        "eval_timestep_respacing": "ddim25",
        "inception_weights": "",
    }


def load_training_data(args, image_size):
    """load_data over --data_dir with the training flags, images of `image_size`."""
    return load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        num_workers=args.num_workers,
        allow_mixed_channels=args.allow_mixed_channels,
        image_channels=args.image_channels,
    )


def create_argparser(model_defaults, description):
    """An argparse parser with the training flags and `model_defaults`."""
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, {**training_defaults(), **model_defaults})
    return parser


def train(args, model_keys, create_model_and_diffusion, make_data):
    """
    Set up processes, logger and seeds, build the model and data, and train.

    :param model_keys: the flags create_model_and_diffusion takes.
    :param make_data: args -> the data iterator (load_data checks every
        rank's files before training and raises the same ValueError on every rank).
    :return: the finished TrainLoop.
    """
    if not args.data_dir:
        raise ValueError("--data_dir is required: a folder of training images")
    dist_util.setup_dist()
    logger.configure()
    if dist_util.get_rank() == 0:
        write_run_flags(logger.get_dir(), vars(args))
    seed_everything(args.seed)
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_keys))
    model.to(dist_util.dev())
    evaluator = make_evaluator(args, model_keys) if args.eval_interval else None
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    logger.log("creating data loader...")
    data = make_data(args)
    logger.log("training...")
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        schedule_sampler=schedule_sampler,
        run_flags=vars(args),
        evaluator=evaluator,
        progress=TrainingProgress(enabled=dist_util.get_rank() == 0),
        **{k: getattr(args, k) for k in _LOOP_KEYS},
    )
    loop.run_loop()
    return loop


_LOOP_KEYS = [
    "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval", "resume_checkpoint",
    "use_fp16", "fp16_scale_growth", "weight_decay", "lr_anneal_steps", "use_bf16", "seed", "max_steps",
    "keep_checkpoints", "max_bad_steps", "allow_partial_resume", "check_replicas", "eval_interval",
    "class_dropout_prob",
]


def make_evaluator(args, model_keys):
    """
    The TrainingEvaluator of --eval_interval: --eval_num_samples samples with
    --eval_sampler over --eval_timestep_respacing, against --data_dir.
    """
    if "large_size" in model_keys:
        raise ValueError("--eval_interval applies to image_train.py; super-resolution runs cannot be scored alone")
    check_eval_interval(args.eval_interval, args.log_interval)
    if args.eval_sampler not in samplers.SAMPLERS:
        known = ", ".join(samplers.SAMPLERS)
        raise ValueError(f"unknown --eval_sampler {args.eval_sampler!r}; known samplers: {known}")
    flags = dict(args_to_dict(args, model_keys), timestep_respacing=args.eval_timestep_respacing)
    logger.log("computing the training data's statistics for --eval_interval...")
    return TrainingEvaluator(
        diffusion=_diffusion_from_flags(flags),
        data_dir=args.data_dir,
        image_size=args.image_size,
        num_samples=args.eval_num_samples,
        batch_size=args.batch_size,
        log_dir=logger.get_dir(),
        sampler=args.eval_sampler,
        num_classes=args.num_classes if args.class_cond else 0,
        seed=args.seed,
        weights_path=args.inception_weights,
        image_channels=args.image_channels,
    )


def main(run):
    """
    Call run() (which returns a TrainLoop) and exit with the status described
    in this module's docstring.
    """
    try:
        loop = run()
    except (ValueError, TrainingError) as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks' lines stay whole when a launcher merges them
        sys.stderr.flush()
        dist_util.cleanup_dist()
        sys.exit(1)
    dist_util.cleanup_dist()
    if loop.stop_signal == signal.SIGINT:
        sys.exit(128 + signal.SIGINT)
