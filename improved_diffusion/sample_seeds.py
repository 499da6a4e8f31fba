"""
Per-sample seeding of sampling runs.

Sample `i` of a run with seed `s` draws its starting noise x_T and every
step's noise from its own generator seeded with (s, i) (the samplers accept a
list of generators, one per sample), and its random class label from a second
generator seeded with (s, i, 1). So the output depends on the seed and the
sample's index only, never on the batch size or on how many ranks share the work.
"""

import secrets

import numpy as np
import torch

from . import dist_util

NOISE_STREAM = 0
LABEL_STREAM = 1


def shared_seed(seed):
    """`seed` if it is >= 0, else a random seed drawn on rank 0 and broadcast."""
    if seed >= 0:
        return seed
    return dist_util.broadcast_object(secrets.randbits(62))


def sample_seed(seed, index, stream=NOISE_STREAM):
    """A 63-bit seed for sample `index` of a run seeded with `seed`, one per stream."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_generators(seed, indices, device, stream=NOISE_STREAM):
    """One torch.Generator on `device` per sample index, seeded by sample_seed."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i, stream)) for i in indices]


def draw_labels(seed, indices, num_classes):
    """Random class labels, int64 [len(indices)], each from its sample's own label stream."""
    generators = sample_generators(seed, indices, "cpu", stream=LABEL_STREAM)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])
