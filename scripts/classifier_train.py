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

import argparse

from improved_diffusion import classifier_util, train_cli
from improved_diffusion.script_util import add_dict_to_argparser


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, classifier_util.classifier_train_defaults())
    args = parser.parse_args(argv)
    train_cli.main(lambda: classifier_util.train_classifier(args))


if __name__ == "__main__":
    main()
