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
--rescale_timesteps, GaussianDiffusion._call_model), which is also how the
samplers hand them to cond_fn.

Checkpoints (checkpointing.CheckpointSet without EMA files), for step N =
optimizer updates in the weights: modelNNNNNN.pt (the classifier's state
dict, guided-diffusion's format), optNNNNNN.pt (AdamW) and stateNNNNNN.pt
(every rank's random streams and data positions, the flags), each written to
a temporary name and renamed, the state file last. A run resumed from a set
continues bitwise as the uninterrupted run would have (CPU, same ranks).
"""

import contextlib
import signal

import blobfile as bf
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from . import flags as flag_table
from .checkpointing import CheckpointSet, latest_complete, plan_resume
from .errors import InputError, UsageError
from .io_util import CheckpointError
from .resample import UniformSampler
from .run_flags import FLAGS_FILENAME
from .script_util import create_classifier
from .train_state import StopRequest, capture_rng, control_group, restore_rng, seed_streams
from .train_util import get_blob_logdir, log_loss_dict

STATE_FORMAT = 1

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


class ClassifierTrainLoop:
    """
    Trains a noisy classifier (guided-diffusion's classifier_train.py) with
    checkpoints that resume exactly and a clean stop on SIGTERM / SIGINT.

    :param model: an EncoderUNetModel, forward(x, timesteps) -> [N x classes] logits.
    :param diffusion: the process whose q_sample noises the images.
    :param data: an iterator of (images [N x C x H x W] in [-1, 1], {"y": [N]
        labels}); if it has state_dict() and load_state_dict(), its position
        is saved and restored on resume. `val_data` likewise, or None.
    :param batch_size: images per rank per step.
    :param microbatch: split each batch into parts of this many images for
        gradient accumulation, each weighted by its share of the batch (-1 or 0: no split).
    :param iterations: train until this many optimizer steps.
    :param eval_interval: with val_data, log the val_ metrics of one
        validation batch every this many steps.
    :param resume_checkpoint: "" (start afresh), a modelNNNNNN.pt path, a log
        directory (its newest complete set) or "auto" (the newest complete set
        in `checkpoint_dir`, if any).
    :param noised: train at timesteps from `schedule_sampler` (default
        uniform) on q_sample'd images; False: t = 0 on clean images.
    :param anneal_lr: decay the learning rate linearly to 0 over `iterations`.
    :param seed: seeds this rank's dropout and sampling streams (mixed with
        the rank); None: draw them from torch's global generator.
    :param run_flags: the run's flags (plain data), saved in state files.
    :param checkpoint_dir: where checkpoints go; default the logger's directory.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        iterations,
        log_interval,
        save_interval,
        resume_checkpoint,
        val_data=None,
        eval_interval=5,
        noised=True,
        schedule_sampler=None,
        weight_decay=0.0,
        anneal_lr=False,
        seed=None,
        run_flags=None,
        checkpoint_dir=None,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.val_data = val_data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.iterations = iterations
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.eval_interval = eval_interval
        self.noised = noised
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.anneal_lr = anneal_lr
        self.seed = seed
        self.run_flags = dict(run_flags or {})
        self.checkpoint_dir = checkpoint_dir or get_blob_logdir()

        self.device = next(model.parameters()).device
        self.rank = dist_util.get_rank() if dist_util.is_initialized() else 0
        self.world_size = dist_util.get_world_size() if dist_util.is_initialized() else 1
        self.step = 0
        self.saved_step = None
        self.stop = StopRequest()
        self.stop_signal = None
        self.generator = torch.Generator(self.device)
        self._seed_streams()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ddp_model = model if self.world_size == 1 else DDP(
            model, device_ids=[self.device] if self.device.type == "cuda" else None
        )
        self._control_group = control_group(self.world_size)
        self._resume(resume_checkpoint)

    def _seed_streams(self):
        """Seed dropout (torch's global generator) and timestep/noise sampling (self.generator) for self.step."""
        seed_streams(self.generator, self.seed, self.rank, self.step)

    # ----- resume ------------------------------------------------------------

    def _resume(self, resume_checkpoint):
        """Load the checkpoint set that `resume_checkpoint` designates, if any (every rank)."""
        plan = plan_resume(resume_checkpoint, self.checkpoint_dir, [])
        if plan is None:
            return
        ckpt, missing, _ = plan
        if missing:
            latest = latest_complete(ckpt.folder)
            hint = f"the newest complete set there is {bf.basename(latest)}" if latest else "no set there is complete"
            raise CheckpointError(
                f"cannot resume from {ckpt.model}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                f"missing, so the checkpoint set of step {ckpt.step} is incomplete (an interrupted save, or a "
                f"classifier not written by classifier_train.py); {hint}"
            )
        logger.log(f"loading the classifier from checkpoint: {ckpt.model}...")
        state = dist_util.load_state_dict(ckpt.model)
        mismatch = state_dict_mismatch(self.model, state)
        if mismatch:
            raise CheckpointError(
                f"{ckpt.model} does not fit this classifier ({mismatch}): give the classifier flags of the "
                f"run that wrote it (its {FLAGS_FILENAME})"
            )
        self.model.load_state_dict(state)
        try:
            self.opt.load_state_dict(dist_util.load_state_dict(ckpt.opt))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt.opt} does not fit this classifier's parameters ({exc})") from exc
        self.step = self.saved_step = ckpt.step
        self._load_run_state(ckpt.state, ckpt.step)

    def _load_run_state(self, path, step):
        """Restore the random streams, data positions and sampler state of the state file of step `step`."""
        state = dist_util.load_state_dict(path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("step") != step:
            raise CheckpointError(f"{path} is not the state file of step {step} written by classifier_train.py")
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path} was written by a run with {state['world_size']} rank(s), this run has {self.world_size}: "
                f"the random streams and data positions are per rank, resume with {state['world_size']}"
            )
        if state["sampler"] and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state["sampler"])
        mine = state["ranks"][self.rank]
        restore_rng(mine["rng"], self.generator)
        for loader, position in ((self.data, mine["data"]), (self.val_data, mine["val_data"])):
            if position is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(position)

    # ----- training ----------------------------------------------------------

    def run_loop(self):
        """
        Train until `iterations` steps or a stop signal, logging every
        log_interval steps and saving every save_interval steps and at the
        end. After SIGTERM or SIGINT (on any rank) every rank finishes its
        step, the set is saved and the loop returns with `stop_signal` set.
        """
        with self.stop.installed():
            while self.step < self.iterations:
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                self._after_step()
                if self._stop_agreed():
                    break
            if self.saved_step != self.step:
                self.save()
        if self.stop_signal is not None:
            logger.log(f"stopped by {signal.Signals(self.stop_signal).name} after saving step {self.step}")

    def run_step(self, batch, cond):
        """
        One optimizer step on this rank's batch (the gradient is averaged over ranks).

        :param batch: [N x C x H x W] images in [-1, 1]; :param cond: {"y": [N] labels}.
        """
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward(batch, cond["y"])
        for group in self.opt.param_groups:
            group["lr"] = self._current_lr()
        self.opt.step()
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.batch_size * self.world_size)

    def forward_backward(self, batch, labels):
        """Accumulate the gradient of the batch's mean cross-entropy; log the train_ metrics."""
        x_t, t, labels = self._noised(batch, labels)
        for part, is_last in self._parts(len(labels)):
            with self._no_sync_unless(is_last):
                loss = self._losses(self.ddp_model, x_t[part], t[part], labels[part], "train")
                (loss.mean() * (len(loss) / len(labels))).backward()

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
        batch, labels = batch.to(self.device), labels.to(self.device)
        if not self.noised:
            return batch, torch.zeros(len(batch), dtype=torch.long, device=self.device), labels
        t, _ = self.schedule_sampler.sample(len(batch), self.device, generator=self.generator)
        return self.diffusion.q_sample(batch, t, generator=self.generator), t, labels

    def _parts(self, size):
        """(slice, is_last) of each microbatch of a batch of `size`."""
        return [(slice(s, s + self.microbatch), s + self.microbatch >= size) for s in range(0, size, self.microbatch)]

    def _losses(self, model, x_t, t, labels, prefix):
        """[n] cross-entropy of a microbatch; logs it and the top-1 and top-5 accuracy, per quartile of t too."""
        logits = self.diffusion._call_model(model, x_t, t, None).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        log_loss_dict(self.diffusion, t, {
            f"{prefix}_loss": loss,
            f"{prefix}_acc@1": top_k_accuracy(logits, labels, 1),
            f"{prefix}_acc@5": top_k_accuracy(logits, labels, 5),
        })
        return loss

    def _no_sync_unless(self, is_last):
        """DDP's no_sync (gradients stay local) for all but the last microbatch."""
        if is_last or self.world_size == 1:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _current_lr(self):
        """The learning rate of the step about to be taken (linear decay to 0 with anneal_lr)."""
        return self.lr * (1 - self.step / self.iterations) if self.anneal_lr else self.lr

    def _after_step(self):
        if self.val_data is not None and self.step % self.eval_interval == 0:
            self.evaluate()
        if self.step % self.log_interval == 0:
            logger.dumpkvs()
        if self.step % self.save_interval == 0:
            self.save()

    def _stop_agreed(self):
        """Whether any rank received a stop signal (the same answer on every rank)."""
        self.stop_signal = self.stop.agreed(self.world_size, self._control_group)
        return self.stop_signal is not None

    # ----- saving ------------------------------------------------------------

    def save(self):
        """
        Write the checkpoint set of the current step (call on every rank: the
        per-rank random and data states are gathered; only rank 0 writes).
        """
        run_state = self._run_state()
        error = None
        if self.rank == 0:
            logger.log(f"saving the classifier's checkpoint set of step {self.step} in {self.checkpoint_dir}...")
            try:
                CheckpointSet(self.checkpoint_dir, self.step, []).save(
                    self.model.state_dict(), {}, self.opt.state_dict(), run_state
                )
            except Exception as exc:
                dist_util.broadcast_object(f"{type(exc).__name__}: {exc}")
                raise
        error = dist_util.broadcast_object(error)
        if error is not None:
            raise RuntimeError(f"rank 0 failed to save the checkpoint set of step {self.step}: {error}")
        self.saved_step = self.step

    def _run_state(self):
        """Everything beyond weights and AdamW that exact resume needs (gathers every rank's part)."""
        local = {
            "rng": capture_rng(self.generator),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "val_data": self.val_data.state_dict() if hasattr(self.val_data, "state_dict") else None,
        }
        sampler = self.schedule_sampler
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "flags": self.run_flags,
            "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
            "ranks": dist_util.all_gather_object(local),
        }


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
