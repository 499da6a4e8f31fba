"""
Train a super-resolution diffusion model: it learns large_size images given
the same images downsampled (area filter) to small_size.

    python scripts/super_res_train.py --data_dir DIR [--flag value ...]

Launch, logging and exit status as image_train.py.
"""

import torch.nn.functional as F

from improved_diffusion import cli, train_cli
from improved_diffusion.flags import parse


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
    return LowResData(train_cli.training_data(args, args.large_size), args.small_size)


@cli.script
def main(argv=None):
    args, explicit = parse("super_res_train", argv, __doc__)
    return train_cli.exit_status(train_cli.train_diffusion("super_res_train", args, explicit, make_data))


if __name__ == "__main__":
    main()
