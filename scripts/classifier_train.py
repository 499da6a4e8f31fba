"""
Train a noisy classifier for classifier guidance (guided-diffusion's
classifier_train.py) on a folder of images named CLASS_*.png.

    python scripts/classifier_train.py --data_dir DIR [--val_data_dir DIR] --num_classes K [--flag value ...]

Also under `mpiexec -n K` or `torchrun --nproc_per_node K`. Checkpoints
(modelNNNNNN.pt, optNNNNNN.pt, stateNNNNNN.pt), flags.json and logs go to
OPENAI_LOGDIR (else a new temporary folder); scripts/classifier_sample.py
takes the modelNNNNNN.pt as --classifier_path. Exit status as the other
training scripts' (improved_diffusion/train_cli.py).
"""

from improved_diffusion import cli, train_cli
from improved_diffusion.flags import parse


@cli.script
def main(argv=None):
    args, _ = parse("classifier_train", argv, __doc__)
    return train_cli.exit_status(train_cli.train_classifier(args))


if __name__ == "__main__":
    main()
