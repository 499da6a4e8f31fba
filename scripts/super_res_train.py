"""
Train a super-resolution diffusion model: it learns large_size images given
the same images downsampled (area filter) to small_size.

    python scripts/super_res_train.py --data_dir DIR [--flag value ...]

Launch, logging and exit status as image_train.py.
"""

import torch.nn.functional as F

from improved_diffusion import train_cli
from improved_diffusion.script_util import (
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


class LowResData:
    """
    Wraps a load_data iterator: yields (large [N x C x L x L], cond + "low_res"
    [N x C x S x S]); state_dict()/load_state_dict() pass through, so resume
    stays exact.
    """

    def __init__(self, data, small_size):
        self.data = data
        self.small_size = small_size

    def __iter__(self):
        return self

    def __next__(self):
        large, cond = next(self.data)
        return large, dict(cond, low_res=F.interpolate(large, self.small_size, mode="area"))

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def make_data(args):
    return LowResData(train_cli.load_training_data(args, args.large_size), args.small_size)


def main():
    model_defaults = sr_model_and_diffusion_defaults()
    args = train_cli.create_argparser(model_defaults, __doc__).parse_args()
    train_cli.main(lambda: train_cli.train(args, model_defaults.keys(), sr_create_model_and_diffusion, make_data))


if __name__ == "__main__":
    main()
