"""
Train a diffusion model on a folder of images.

    python scripts/image_train.py --data_dir DIR [--flag value ...]

Also under `mpiexec -n K` or `torchrun --nproc_per_node K`. Checkpoints and
logs go to OPENAI_LOGDIR (else a new temporary folder); see
improved_diffusion/train_cli.py for the exit status.
"""

from improved_diffusion import train_cli
from improved_diffusion.image_datasets import load_data
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def make_data(args):
    return load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        num_workers=args.num_workers,
        allow_mixed_channels=args.allow_mixed_channels,
    )


def main():
    model_defaults = model_and_diffusion_defaults()
    args = train_cli.create_argparser(model_defaults, __doc__).parse_args()
    train_cli.main(lambda: train_cli.train(args, model_defaults.keys(), create_model_and_diffusion, make_data))


if __name__ == "__main__":
    main()
