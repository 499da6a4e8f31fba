"""
Timestep samplers for training: which t each example is trained at, with
importance weights that keep the loss an unbiased estimate (IDDPM section 3.3).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    """
    A ScheduleSampler by name.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion process to sample timesteps for. A
        continuous-time process (EDM, flow) draws its own noise levels: "uniform"
        means those (ProcessLevelSampler).
    """
    if hasattr(diffusion, "sample_training_levels"):
        if name != "uniform":
            raise ValueError(
                f"schedule sampler {name!r} is for the DDPM family's timesteps; a continuous-time process "
                "draws its own noise levels: use 'uniform' (the default)"
            )
        return ProcessLevelSampler(diffusion)
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; known samplers: {', '.join(SCHEDULE_SAMPLERS)}")


class ProcessLevelSampler:
    """
    The training noise levels of a continuous-time process (EDM's sigma,
    a flow's t), drawn from its own distribution, each with weight 1.
    """

    def __init__(self, process):
        self.process = process

    def sample(self, batch_size, device, generator=None):
        """(levels, weights): float32 [N] noise levels and float32 [N] ones."""
        levels = self.process.sample_training_levels(batch_size, device, generator)
        return levels, torch.ones(batch_size, device=device)

    def state_dict(self):
        """What exact resume needs (nothing: the levels come from the run's generator)."""
        return {}

    def load_state_dict(self, state):
        """Restore what state_dict returned."""


class ScheduleSampler(ABC):
    """
    A distribution over timesteps. Subclasses give unnormalized weights; the
    importance weight of t is 1 / (T p_t), so the weighted loss keeps the
    uniform objective's expectation.
    """

    @abstractmethod
    def weights(self):
        """A numpy array of T positive, unnormalized weights."""

    def sample(self, batch_size, device, generator=None):
        """
        Draw timesteps for a batch.

        :param generator: an optional torch.Generator on `device`.
        :return: (timesteps, weights): an int64 [N] tensor and a float32 [N] tensor.
        """
        w = torch.as_tensor(self.weights(), dtype=torch.float64, device=device)
        p = w / w.sum()
        indices = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = (1.0 / (len(p) * p[indices])).float()
        return indices, weights

    def state_dict(self):
        """What exact resume needs (nothing for a fixed distribution)."""
        return {}

    def load_state_dict(self, state):
        """Restore what state_dict returned."""


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; every importance weight is 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights

    def sample(self, batch_size, device, generator=None):
        indices = torch.randint(
            0, self.diffusion.num_timesteps, (batch_size,), device=device, generator=generator
        )
        return indices, torch.ones(batch_size, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses seen at each timestep."""

    def update_with_local_losses(self, local_ts, local_losses):
        """
        Share this rank's (timestep, loss) pairs with every rank, then update
        each rank's sampler identically with all of them.

        :param local_ts: an int [N] tensor of timesteps.
        :param local_losses: a float [N] tensor of losses.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            timesteps, losses = _all_gather_pairs(local_ts, local_losses)
        else:
            timesteps = local_ts.tolist()
            losses = local_losses.detach().float().tolist()
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the weights from every rank's losses, in the same order on every rank.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


def _all_gather_pairs(local_ts, local_losses):
    """Every rank's timesteps and losses, concatenated in rank order."""
    world = dist.get_world_size()
    device = local_ts.device
    size = torch.tensor([len(local_ts)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    max_size = max(sizes)
    ts_pad = torch.zeros(max_size, dtype=torch.int64, device=device)
    loss_pad = torch.zeros(max_size, dtype=torch.float32, device=device)
    ts_pad[: len(local_ts)] = local_ts
    loss_pad[: len(local_losses)] = local_losses.detach().float()
    all_ts = [torch.zeros_like(ts_pad) for _ in range(world)]
    all_losses = [torch.zeros_like(loss_pad) for _ in range(world)]
    dist.all_gather(all_ts, ts_pad)
    dist.all_gather(all_losses, loss_pad)
    timesteps = [t for ts, n in zip(all_ts, sizes) for t in ts[:n].tolist()]
    losses = [x for ls, n in zip(all_losses, sizes) for x in ls[:n].tolist()]
    return timesteps, losses


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t with probability proportional to sqrt(E[L_t²]) over the last
    history_per_term losses at t, mixed with uniform_prob of the uniform
    distribution (IDDPM eq. 18); uniform until every t has a full history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self):
        """The loss history as tensors (loadable with weights_only=True)."""
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        history = state["loss_history"].numpy().astype(np.float64)
        counts = state["loss_counts"].numpy().astype(np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state has a history of shape {history.shape}, this sampler expects "
                f"{self._loss_history.shape} (diffusion_steps x history_per_term): were the flags changed?"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
