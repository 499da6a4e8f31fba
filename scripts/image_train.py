"""
Train a diffusion model on a folder of images.

    python scripts/image_train.py --data_dir DIR [--flag value ...]

Also under `mpiexec -n K` or `torchrun --nproc_per_node K`. Checkpoints and
logs go to OPENAI_LOGDIR (else a new temporary folder); see
improved_diffusion/train_cli.py for the exit status.
"""

from improved_diffusion import cli, train_cli
from improved_diffusion.flags import parse


@cli.script
def main(argv=None):
    args, explicit = parse("image_train", argv, __doc__)
    loop = train_cli.train_diffusion("image_train", args, explicit,
                                     lambda args: train_cli.training_data(args, args.image_size))
    return train_cli.exit_status(loop)


if __name__ == "__main__":
    main()
