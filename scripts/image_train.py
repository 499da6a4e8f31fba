"""
Train a diffusion model on a folder of images.

    python scripts/image_train.py --data_dir DIR [--flag value ...]

Also under `mpiexec -n K` or `torchrun --nproc_per_node K`. Checkpoints and
logs go to OPENAI_LOGDIR (else a new temporary folder); see
improved_diffusion/train_cli.py for the exit status.
"""

from improved_diffusion import train_cli
from improved_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def make_data(args):
    return train_cli.load_training_data(args, args.image_size)


def main():
    model_defaults = model_and_diffusion_defaults()
    args = train_cli.create_argparser(model_defaults, __doc__).parse_args()
    train_cli.main(lambda: train_cli.train(args, model_defaults.keys(), create_model_and_diffusion, make_data))


if __name__ == "__main__":
    main()
