"""
Classifier guidance with a noisy classifier (Dhariwal & Nichol 2021), as
guided-diffusion's classifier_train.py and classifier_sample.py run it: the
loop that trains an EncoderUNetModel on noised images, the cond_fn that turns
a classifier into guidance for any sampler, and the loading of a classifier
for sampling. (Their flags are turned into calls by train_cli.py and
scripts/classifier_sample.py.)

Training: each step draws timesteps from the schedule sampler, noises the
batch with q_sample (t = 0 and clean images without `noised`) and takes one
AdamW step on the cross-entropy. The classifier sees the timesteps exactly
as the diffusion model does (mapped to the base process and rescaled with
--rescale_timesteps, the process's call_model), which is also how the
samplers hand them to cond_fn.

Checkpoints (checkpointing.CheckpointSet without EMA files, with post-hoc
EMA snapshots under --ema_std), for step N = optimizer updates in the
weights: modelNNNNNN.pt (the classifier's state dict, guided-diffusion's
format), optNNNNNN.pt (AdamW) and stateNNNNNN.pt (every rank's random streams
and data positions, the flags), each written to a temporary name and renamed,
the state file last. A run resumed from a set continues bitwise as the
uninterrupted run would have (CPU, same ranks).
"""

import torch
import torch.nn.functional as F

from . import dist_util
from . import flags as flag_table
from .errors import InputError, UsageError
from .io_util import CheckpointError
from .resample import UniformSampler
from .run_flags import FLAGS_FILENAME
from .script_util import create_classifier
from .train_core import TrainingCore, log_loss_dict

# The classifier flags its weights' layout depends on.
CLASSIFIER_ARCHITECTURE = flag_table.names_of_kind(flag_table.CLASSIFIER[1:], flag_table.ARCHITECTURE)

# ---------------------------------------------------------------- guidance


def classifier_cond_fn(classifier, scale):
    """
    A cond_fn for diffusion.sample_loop(..., cond_fn=...) from a noisy classifier.

    :param classifier: forward(x [N x C x H x W], t [N]) -> [N x classes] logits.
    :param scale: the guidance scale s.
    :return: cond_fn(x, t, y=None, **kwargs) -> s * grad_x log p(y | x_t),
        [N x C x H x W]; y [N] holds the requested classes (model_kwargs["y"]),
        other model kwargs are ignored. It needs autograd: sample under
        torch.no_grad, not torch.inference_mode.
    """

    def cond_fn(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier guidance needs the requested classes: pass model_kwargs={'y': labels}")
        # Dhariwal & Nichol 2021, Algorithms 1 and 2: the sampler adds s * grad log p_phi(y | x_t)
        # to the mean (scaled by the variance) or subtracts it from eps (scaled by sqrt(1 - abar_t)).
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            chosen = log_probs[torch.arange(len(y), device=log_probs.device), y]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    return cond_fn


def top_k_accuracy(logits, labels, k):
    """
    1.0 where the label is among the k largest logits (among all of them when
    there are fewer than k classes), else 0.0.

    :param logits: [N x classes]; :param labels: [N] class indices.
    :return: float [N].
    """
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float()


# ---------------------------------------------------------------- training


class ClassifierTrainLoop(TrainingCore):
    """
    Trains a noisy classifier (guided-diffusion's classifier_train.py): a
    thin loop over train_core.TrainingCore (microbatches, the update,
    checkpoints that resume exactly, stop signals) that adds the
    cross-entropy on noised images and the train_ / val_ metrics.

    :param model: an EncoderUNetModel, forward(x, timesteps) -> [N x classes] logits.
    :param diffusion: the process whose q_sample noises the images.
    :param data: an iterator of (images [N x C x H x W] in [-1, 1], {"y": [N]
        labels}); if it has state_dict() and load_state_dict(), its position
        is saved and restored on resume. `val_data` likewise, or None.
    :param iterations: train until this many optimizer steps.
    :param eval_interval: with val_data, log the val_ metrics of one
        validation batch every this many steps.
    :param noised: train at timesteps from `schedule_sampler` (default
        uniform) on q_sample'd images; False: t = 0 on clean images.
    :param anneal_lr: decay the learning rate linearly to 0 over `iterations`.
    :param options: the keywords of train_core.TrainingCore (batch_size,
        microbatch, lr, log_interval, save_interval, resume_checkpoint,
        weight_decay, seed, run_flags, checkpoint_dir, ema_std, ...), but its
        max_steps and lr_anneal_steps, which `iterations` and `anneal_lr` set.
    """

    def __init__(self, *, diffusion, iterations, val_data=None, eval_interval=5, noised=True, anneal_lr=False,
                 schedule_sampler=None, **options):
        self.diffusion = diffusion
        self.val_data = val_data
        self.eval_interval = eval_interval
        self.noised = noised
        super().__init__(schedule_sampler=schedule_sampler or UniformSampler(diffusion), max_steps=iterations,
                         lr_anneal_steps=iterations if anneal_lr else 0, **options)

    # ----- the core's hooks --------------------------------------------------

    def _step_gradient(self, batch, cond):
        return self.forward_backward(batch, cond["y"])

    def _load_model_weights(self, state, source):
        mismatch = state_dict_mismatch(self.model, state)
        if mismatch:
            raise CheckpointError(
                f"{source} does not fit this classifier ({mismatch}): give the classifier flags of the "
                f"run that wrote it (its {FLAGS_FILENAME})"
            )
        self.model.load_state_dict(state)

    def _evaluate_if_due(self):
        """The val_ metrics every eval_interval steps, written with the next row."""
        if self.val_data is not None and self.step % self.eval_interval == 0:
            self.evaluate()
        return False

    def _loaders(self):
        return {"data": self.data, "val_data": self.val_data}

    # ----- the loss ----------------------------------------------------------

    def forward_backward(self, batch, labels):
        """
        Accumulate the gradient of the batch's mean cross-entropy; log the
        train_ metrics; return the loss (0-d, detached).

        :param batch: [N x C x H x W] images in [-1, 1]; :param labels: [N] classes.
        """
        x_t, t, labels = self._noised(batch, labels)
        return self._backward_in_parts(
            len(labels), lambda part: self._losses(self._model_fn, x_t[part], t[part], labels[part], "train").mean()
        )

    def evaluate(self):
        """Log the val_ metrics of the next validation batch (eval mode, no gradient)."""
        batch, cond = next(self.val_data)
        self.model.eval()
        with torch.no_grad():
            x_t, t, labels = self._noised(batch, cond["y"])
            for part, _ in self._parts(len(labels)):
                self._losses(self.model, x_t[part], t[part], labels[part], "val")
        self.model.train()

    def _noised(self, batch, labels):
        """(x_t [N x C x H x W], t [N], labels [N]) on the device: q_sample at sampled t, or t = 0 and x_0."""
        batch, labels = self._to_device(batch), self._to_device(labels)
        if not self.noised:
            return batch, torch.zeros(len(batch), dtype=torch.long, device=self.device), labels
        t, _ = self.schedule_sampler.sample(len(batch), self.device, generator=self.generator)
        return self.diffusion.q_sample(batch, t, generator=self.generator), t, labels

    def _losses(self, model, x_t, t, labels, prefix):
        """[n] cross-entropy of a microbatch; logs it and the top-1 and top-5 accuracy, per quartile of t too."""
        logits = self.diffusion.call_model(model, x_t, t).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        log_loss_dict(self.diffusion, t, {
            f"{prefix}_loss": loss,
            f"{prefix}_acc@1": top_k_accuracy(logits, labels, 1),
            f"{prefix}_acc@5": top_k_accuracy(logits, labels, 5),
        })
        return loss


def state_dict_mismatch(model, state):
    """How `state` does not fit `model`'s state dict, in a few words ("" when it fits)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) such as {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {unexpected[0]}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of another shape, such as {shapes[0]}")
    return "; ".join(problems)


# ---------------------------------------------------------------- sampling


def load_classifier(path, flags):
    """
    Build the classifier of `flags` (create_classifier's keyword arguments) on
    the meta device and load `path` into it (no random initialization of its weights).

    :return: the classifier in eval mode on dist_util.dev() (torso in float16 with classifier_use_fp16).
    :raises UsageError: when the flags are invalid or classifier_use_fp16 is
        asked for without CUDA; InputError when the checkpoint does not fit them.
    """
    if flags["classifier_use_fp16"] and dist_util.dev().type != "cuda":
        raise UsageError("--classifier_use_fp16 True needs a CUDA device; on CPU drop it (float32 classifier)")
    try:
        with torch.device("meta"):
            classifier = create_classifier(**flags)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    state = dist_util.load_state_dict(path)
    mismatch = state_dict_mismatch(classifier, state)
    if mismatch:
        given = ", ".join(f"--{k} {flags[k]}" for k in CLASSIFIER_ARCHITECTURE)
        raise InputError(
            f"the classifier checkpoint {path} does not fit the classifier flags ({given}; {flags['num_classes']} "
            f"classes, {flags['image_channels']}-channel {flags['image_size']}x{flags['image_size']} images): {mismatch}. Give the classifier flags "
            f"it was trained with, or keep the {FLAGS_FILENAME} of its classifier_train.py run beside it"
        )
    classifier.to_empty(device=dist_util.dev())
    classifier.load_state_dict(state)
    if flags["classifier_use_fp16"]:
        classifier.convert_to_fp16()
    return classifier.eval()
