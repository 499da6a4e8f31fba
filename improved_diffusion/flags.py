"""
Every command-line flag of the scripts, declared once.

A flag is one `Flag` record: its name, default, help text, its *kind* and the
heading it is listed under in `--help`. The kind says what a value means for
a checkpoint:

    architecture  decides the network: weights built with another value do not
                  load, or mean something else (the attention heads);
    process       decides the noise process or objective: the same weights
                  sampled with another value give wrong samples;
    training      only the training run (its schedule, data, precision, loss weights);
    sampling      only a sampling or evaluation run.

From the table come every script's parser (`parser_for`, grouped under the
headings of GROUPS, each flag with its help and default), the defaults dicts
of the reference (`script_util.model_and_diffusion_defaults()` and the others
are `defaults(NAMES)`), the flags a sampling run takes from a training run's
flags.json (`CHECKPOINT_KINDS`) and the checks of given flags against a
checkpoint's (`contradictions`).

A flag may apply to some objectives only (`objectives`: --diffusion_steps
means nothing to EDM, --sigma_data nothing to DDPM); given with another
objective it is a usage error naming it (`objective_conflicts`). A flag may
also have a default per objective (`per_objective`: the evaluation sampler is
ddim for DDPM, heun for EDM), which `apply_objective_defaults` puts in place of
the table's when the flag was not given.

Adding a flag: one `Flag(...)` in FLAGS, its name in the script sets that
take it (SCRIPTS), and the code that reads it.
"""

import argparse
import dataclasses

from .errors import UsageError

ARCHITECTURE = "architecture"
PROCESS = "process"
TRAINING = "training"
SAMPLING = "sampling"
KINDS = (ARCHITECTURE, PROCESS, TRAINING, SAMPLING)

# The kinds that a checkpoint fixes: a sampling run takes them from the
# training run's flags.json, and a value given against them is an error.
CHECKPOINT_KINDS = (ARCHITECTURE, PROCESS)

# --help headings, in this order.
GROUPS = ("INPUT", "MODEL", "DIFFUSION", "TRAIN", "SAMPLE", "CLASSIFIER", "EVAL")

# The training objectives (--objective): the DDPM family of SPEC sections 1-15,
# EDM (edm.py) and flow matching (flow.py).
OBJECTIVES = ("ddpm", "edm", "flow")
DDPM, EDM, FLOW = OBJECTIVES

NUM_CLASSES = 1000

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def str2bool(v):
    """Parse a command-line boolean: yes/true/t/y/1 or no/false/f/n/0, any case."""
    if isinstance(v, bool):
        return v
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"boolean value expected, got {v!r}: use one of {'/'.join(_TRUE)} for true "
        f"or {'/'.join(_FALSE)} for false"
    )


def image_size(text):
    """
    An --image_size: "S" (square) -> S, "H,W" -> "H,W" (a rectangle, kept as
    text so that flags.json reads back what was written), "S,S" -> S.
    """
    try:
        sides = [int(part) for part in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size S or H,W of positive integers (e.g. 64 or 32,64)")
    return sides[0] if len(set(sides)) == 1 else f"{sides[0]},{sides[1]}"


def type_of(default):
    """The argparse type a default implies: str2bool for booleans, str for None, else its own type."""
    if default is None:
        return str
    if isinstance(default, bool):
        return str2bool
    return type(default)


@dataclasses.dataclass(frozen=True)
class Flag:
    """
    One command-line flag.

    :param kind: one of KINDS.
    :param group: the --help heading, one of GROUPS.
    :param type: the argparse type; None: implied by the default (type_of).
    :param choices: the accepted values, or None for any.
    :param positional: an argument given by position (a path), not as --name.
    :param objectives: the objectives (OBJECTIVES) the flag applies to; None: all.
    :param per_objective: {objective: default} where an objective's default
        differs from `default` (see apply_objective_defaults).
    """

    name: str
    default: object
    kind: str
    group: str
    help: str
    type: object = None
    choices: tuple = None
    positional: bool = False
    objectives: tuple = None
    per_objective: dict = None

    def __post_init__(self):
        if self.kind not in KINDS or self.group not in GROUPS or not self.help:
            raise ValueError(f"flag {self.name}: kind {self.kind!r}, group {self.group!r} and a help text are needed")
        named = (*(self.objectives or ()), *(self.per_objective or {}))
        if not set(named) <= set(OBJECTIVES):
            raise ValueError(f"flag {self.name}: objectives must be among {', '.join(OBJECTIVES)}, got {named}")

    def default_for(self, objective):
        """The default under `objective`."""
        return (self.per_objective or {}).get(objective, self.default)

    def parse_type(self):
        return self.type or type_of(self.default)

    def with_default(self, default, help=None):
        """This flag with another default (and help) for one script."""
        return dataclasses.replace(self, default=default, help=help or self.help)


def _declare(*flags):
    table = {}
    for flag in flags:
        if flag.name in table:
            raise ValueError(f"flag {flag.name} is declared twice")
        table[flag.name] = flag
    return table


A, P, T, S = ARCHITECTURE, PROCESS, TRAINING, SAMPLING

FLAGS = _declare(
    # ------------------------------------------------------------ MODEL
    Flag("image_size", 64, A, "MODEL", 'size of the images the model makes, in pixels: S (square) or H,W',
         type=image_size),
    Flag("num_channels", 128, A, "MODEL", "width of the UNet's first level"),
    Flag("num_res_blocks", 2, A, "MODEL", "residual blocks per level"),
    Flag("num_heads", 4, A, "MODEL", "attention heads (when --num_head_channels is -1)"),
    Flag("num_heads_upsample", -1, A, "MODEL", "attention heads on the way up (-1: --num_heads)"),
    Flag("attention_resolutions", "16,8", A, "MODEL",
         'resolutions whose blocks get self-attention, e.g. "16,8" (16: 16x16); "" for none'),
    Flag("dropout", 0.0, T, "MODEL", "dropout rate of the residual blocks (training only)"),
    Flag("learn_sigma", False, A, "MODEL",
         "the model also outputs the reverse-process variance (IDDPM): twice the output channels",
         objectives=(DDPM,)),
    Flag("class_cond", False, A, "MODEL", "class-conditional model (labels from the file names' prefixes)"),
    Flag("use_checkpoint", False, T, "MODEL", "gradient checkpointing: less memory, more compute"),
    Flag("use_scale_shift_norm", True, A, "MODEL", "the timestep embedding scales and shifts the norm (FiLM)"),
    Flag("channel_mult", "", A, "MODEL",
         'width multiplier of each level, e.g. "1,2,2,2"; "" picks the default of the image size'),
    Flag("num_classes", NUM_CLASSES, A, "MODEL", "classes of a class-conditional model or classifier"),
    Flag("num_head_channels", -1, A, "MODEL", "channels per attention head (-1: use --num_heads)"),
    Flag("resblock_updown", False, A, "MODEL", "residual blocks that resample between levels (guided-diffusion)"),
    Flag("use_new_attention_order", False, A, "MODEL", "split q, k, v before the heads (guided-diffusion)"),
    Flag("use_fp16", False, T, "MODEL",
         "float16 autocast with a dynamic loss scale (training) or float16 weights (sampling); CUDA only"),
    Flag("class_dropout_prob", 0.0, T, "MODEL",
         "each training label becomes the null label with this probability (classifier-free guidance); "
         "needs --null_label True"),
    Flag("null_label", False, A, "MODEL",
         "one more label embedding, index --num_classes, meaning no class (classifier-free guidance)"),
    Flag("image_channels", 3, A, "MODEL", "3: RGB; 1: every image converted to grayscale", choices=(1, 3)),
    Flag("large_size", 256, A, "MODEL", "side of the images a super-resolution model makes"),
    Flag("small_size", 64, A, "MODEL", "side of the low-resolution images it upsamples"),
    # ------------------------------------------------------------ DIFFUSION
    Flag("objective", DDPM, P, "DIFFUSION",
         "ddpm (the DDPM family: eps, x_0 or v prediction), edm (Karras et al. 2022) or flow (flow matching)",
         choices=OBJECTIVES),
    Flag("sigma_small", False, P, "DIFFUSION",
         "fixed reverse variance beta~ (the posterior's) instead of beta, without --learn_sigma",
         objectives=(DDPM,)),
    Flag("diffusion_steps", 1000, P, "DIFFUSION", "T, the steps of the training process", objectives=(DDPM,)),
    Flag("noise_schedule", "linear", P, "DIFFUSION", "beta schedule", choices=("linear", "cosine"),
         objectives=(DDPM,)),
    Flag("timestep_respacing", "", S, "DIFFUSION",
         'timesteps (nodes) to sample with: "" (all; edm: karras18, flow: uniform50), "ddimN", "trailingN", '
         '"uniformN", "quadN", "logsnrN", "karrasN", section counts "10,15,20", or a .json list (integer '
         "timesteps; edm: sigmas; flow: times t)"),
    Flag("continuous_timesteps", False, S, "DIFFUSION",
         "logsnrN, karrasN, quadN, trailingN and uniformN at their exact fractional timesteps (abar "
         "interpolated in log between integers) instead of the nearest integers", objectives=(DDPM,)),
    Flag("use_kl", False, T, "DIFFUSION", "train on the variational bound (RESCALED_KL loss)", objectives=(DDPM,)),
    Flag("predict_xstart", False, P, "DIFFUSION", "the model predicts x_0 instead of the noise",
         objectives=(DDPM,)),
    Flag("predict_v", False, P, "DIFFUSION", "the model predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0",
         objectives=(DDPM,)),
    Flag("snr_gamma", 0.0, T, "DIFFUSION", "min-SNR-gamma weighting of the mse term (0: off)", objectives=(DDPM,)),
    Flag("rescale_zero_terminal_snr", False, P, "DIFFUSION",
         "rescale the betas so that abar = 0 at the last step (needs --predict_v or --predict_xstart)",
         objectives=(DDPM,)),
    Flag("rescale_timesteps", True, P, "DIFFUSION", "the model sees timesteps scaled to [0, 1000)",
         objectives=(DDPM,)),
    Flag("rescale_learned_sigmas", True, T, "DIFFUSION",
         "with --learn_sigma, add the variational bound to the mse loss (RESCALED_MSE)", objectives=(DDPM,)),
    Flag("sigma_data", 0.5, P, "DIFFUSION", "edm: the data's standard deviation sigma_d (images in [-1, 1])",
         objectives=(EDM,)),
    Flag("sigma_min", 0.002, P, "DIFFUSION", "edm: the noise level sampling ends at (then 0)",
         objectives=(EDM,)),
    Flag("sigma_max", 80.0, P, "DIFFUSION", "edm: the noise level sampling starts from", objectives=(EDM,)),
    Flag("P_mean", -1.2, T, "DIFFUSION", "edm: the mean of ln sigma in training", objectives=(EDM,)),
    Flag("P_std", 1.2, T, "DIFFUSION", "edm: the standard deviation of ln sigma in training", objectives=(EDM,)),
    Flag("logit_mean", 0.0, T, "DIFFUSION", "flow: the mean of logit(t) in training (logit_normal)",
         objectives=(FLOW,)),
    Flag("logit_std", 1.0, T, "DIFFUSION", "flow: the standard deviation of logit(t) in training (logit_normal)",
         objectives=(FLOW,)),
    Flag("time_sampling", "logit_normal", T, "DIFFUSION", "flow: how training times t are drawn",
         choices=("logit_normal", "uniform"), objectives=(FLOW,)),
    # ------------------------------------------------------------ TRAIN
    Flag("data_dir", "", T, "INPUT", "folder of training images (.png, .jpg, .jpeg, .gif; searched recursively)"),
    Flag("schedule_sampler", "uniform", T, "TRAIN", "how training timesteps are drawn",
         choices=("uniform", "loss-second-moment"), objectives=(DDPM,)),
    Flag("lr", 1e-4, T, "TRAIN", "AdamW learning rate"),
    Flag("weight_decay", 0.0, T, "TRAIN", "AdamW weight decay"),
    Flag("lr_anneal_steps", 0, T, "TRAIN", "decay the learning rate linearly to 0 over this many steps, then stop"),
    Flag("batch_size", 1, T, "TRAIN", "images per rank per step"),
    Flag("microbatch", -1, T, "TRAIN", "split each batch into parts of this many images (-1: no split)"),
    Flag("ema_rate", "0.9999", T, "TRAIN", 'EMA rates of the weights, comma-separated (e.g. "0.9999,0.999")'),
    Flag("log_interval", 10, T, "TRAIN", "write the logged statistics every this many steps"),
    Flag("save_interval", 10000, T, "TRAIN", "save a checkpoint set every this many steps"),
    Flag("resume_checkpoint", "", T, "TRAIN",
         "continue exactly from a modelNNNNNN.pt, a run folder (its newest complete set) or auto"),
    Flag("fp16_scale_growth", 1e-3, T, "TRAIN", "growth of the log2 loss scale per finite step (--use_fp16)"),
    Flag("seed", 0, T, "TRAIN", "seed of the run's random streams"),
    Flag("max_steps", 0, T, "TRAIN", "stop after this many steps, learning rate unchanged (0: no limit)"),
    Flag("use_bf16", False, T, "TRAIN", "bfloat16 autocast (emulated and slow on CPUs without native bfloat16)"),
    Flag("random_flip", False, T, "TRAIN", "flip training images left-right at random"),
    Flag("keep_checkpoints", 0, T, "TRAIN", "keep only the newest K checkpoint sets (0: all)"),
    Flag("max_bad_steps", 20, T, "TRAIN", "end the run after this many non-finite steps in a row (0: never)"),
    Flag("allow_partial_resume", False, T, "TRAIN", "resume from a set missing its EMA, optimizer or state file"),
    Flag("check_replicas", False, T, "TRAIN", "check at each save that all ranks hold identical weights"),
    Flag("num_workers", 1, T, "TRAIN", "image decoding processes"),
    Flag("allow_mixed_channels", False, T, "TRAIN",
         "accept a folder mixing grayscale, RGB and CMYK files (all converted)"),
    Flag("random_crop", False, T, "TRAIN",
         "crop each training image at a random position after resizing (default: the center)"),
    Flag("val_data_dir", "", T, "INPUT", "folder of validation images, named as --data_dir's"),
    Flag("noised", True, T, "TRAIN", "train the classifier on noised images at random timesteps (else t = 0)"),
    Flag("iterations", 150000, T, "TRAIN", "optimizer steps to train for"),
    Flag("ema_std", "", T, "TRAIN",
         'post-hoc EMA: sigma_rel of the power-function EMA profiles to track, e.g. "0.05,0.10" ("": none)'),
    Flag("ema_snapshot_interval", 0, T, "TRAIN",
         "store a snapshot of each --ema_std profile every this many steps (0: at every save)"),
    Flag("grad_clip", 0.0, T, "TRAIN",
         "scale the gradient down to this global norm before each update when it is longer (0: off); "
         "the logged grad_norm is the norm before clipping"),
    Flag("lr_warmup_steps", 0, T, "TRAIN",
         "raise the learning rate linearly from 0 over the first K updates, then follow the schedule (0: off)"),
    Flag("save_format", "pt", T, "TRAIN", "format of the model and EMA files of checkpoint sets",
         choices=("pt", "safetensors")),
    Flag("init_checkpoint", "", T, "TRAIN",
         "start a new run from these weights (a model or EMA file, .pt or .safetensors, or a published "
         "checkpoint) with a fresh optimizer, EMA, step count and schedule"),
    Flag("anneal_lr", False, T, "TRAIN", "decay the learning rate linearly to 0 over --iterations"),
    # ------------------------------------------------------------ EVAL
    Flag("eval_interval", 0, T, "EVAL",
         "score the first EMA every this many steps and at the end (a multiple of --log_interval; 0: off)"),
    Flag("eval_num_samples", 1000, T, "EVAL", "samples per evaluation"),
    Flag("eval_sampler", "ddim", T, "EVAL", "sampler of the evaluation samples",
         per_objective={EDM: "heun", FLOW: "euler"}),
    Flag("eval_timestep_respacing", "ddim25", T, "EVAL", "timesteps of the evaluation samples",
         per_objective={EDM: "karras13", FLOW: "uniform25"}),
    Flag("inception_weights", "", S, "EVAL",
         "path of pt_inception-2015-12-05-6726825d.pth (default: torch hub's checkpoint cache)"),
    Flag("ref_stats", "", S, "EVAL", "the cache of REF's statistics (default: REF.fid_stats.npz)"),
    Flag("ref", None, S, "INPUT", "reference images: an npz (arr_0 uint8 [N x H x W x 3]) or an image folder",
         positional=True),
    Flag("samples", None, S, "INPUT", "the images to score, in the same forms", positional=True),
    Flag("logdir", None, S, "INPUT", "the training run's log directory (holds progress.csv)", positional=True),
    Flag("log_dir", "", S, "INPUT", "the training run's folder (its phema_*.pt snapshots)"),
    Flag("step", None, S, "SAMPLE", "the update to reconstruct at, from the snapshots up to it (None: the newest)",
         type=int),
    Flag("in_path", None, S, "INPUT", "the checkpoint to read (.pt, or .safetensors)", positional=True),
    Flag("out_path", None, S, "INPUT", "the file to write (.safetensors, or .pt)", positional=True),
    Flag("keys", "loss,mse,vb", S, "EVAL", "comma-separated loss columns to draw"),
    # ------------------------------------------------------------ SAMPLE
    Flag("model_path", "", S, "INPUT",
         "the checkpoint to load (model*.pt or ema_*.pt; flags.json beside it gives the model flags)"),
    Flag("base_samples", "", S, "INPUT", "npz of low-resolution images to upsample (arr_0, and arr_1 labels)"),
    Flag("clip_denoised", True, S, "SAMPLE", "clamp each predicted x_0 to [-1, 1]"),
    Flag("num_samples", 10000, S, "SAMPLE", "samples to draw, over all ranks"),
    Flag("use_ddim", False, S, "SAMPLE", "DDIM sampling (the ddim sampler)"),
    Flag("eta", 0.0, S, "SAMPLE", "noise scale of ddim (and of dpmpp_2m_sde, whose default is 1)"),
    Flag("class_label", -1, S, "SAMPLE", "the class of every sample (-1: random classes)"),
    Flag("save_pngs", False, S, "SAMPLE", "also write one PNG per sample"),
    Flag("sampler", "", S, "SAMPLE",
         "ddpm, ddim, plms, euler, heun, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc "
         '("": ddim with --use_ddim True, else ddpm)', per_objective={EDM: "heun", FLOW: "euler"}),
    Flag("sample_name", "", S, "SAMPLE", "stem of the output files (default: samples)"),
    Flag("guidance_scale", 1.0, S, "SAMPLE", "classifier-free guidance scale (1: none)"),
    Flag("guidance_interval", "", S, "SAMPLE",
         'guide only at base timesteps "lo,hi" ("": all; edm: sigmas, flow: times t)'),
    Flag("compile", False, S, "SAMPLE", "torch.compile the model (needs a C++ compiler on CPU)"),
    Flag("steps", 10, S, "SAMPLE", "timesteps to search for"),
    # ------------------------------------------------------------ RESTORE (image_restore.py)
    Flag("input", "", S, "INPUT",
         "the images to restore: an npz (arr_0 uint8 [N x H x W x C], arr_1 labels) or a folder of PNGs"),
    Flag("task", "", S, "SAMPLE", "the measurement to restore from: inpaint, super_res, deblur or colorize"),
    Flag("mask", "", S, "INPUT",
         "inpaint's mask, white or 1 = known: a PNG, an npz (arr_0 [H x W], [H x W x C] or [N x H x W x C]), "
         "or half (the right half to fill), box (a centred box) or random (half the pixels, from --seed)"),
    Flag("method", "ddnm", S, "SAMPLE", "sdedit, replace, repaint, ddnm or dps",
         choices=("sdedit", "replace", "repaint", "ddnm", "dps")),
    Flag("t_start", 0.5, S, "SAMPLE", "sdedit: the fraction of the walk sampled from the noised input, in (0, 1]"),
    Flag("dps_scale", 1.0, S, "SAMPLE", "dps: the step size zeta' on grad ||y - A(x0_hat)||^2 / ||y - A(x0_hat)||"),
    Flag("jump_length", 10, S, "SAMPLE", "repaint: steps climbed back up at each resampling"),
    Flag("jump_n_sample", 10, S, "SAMPLE", "repaint: passes over each resampled stretch (1: none, as replace)"),
    Flag("sigma_y", 0.0, S, "SAMPLE", "standard deviation of the noise added to the measurement (images in [-1, 1])"),
    Flag("super_res_factor", 2, S, "SAMPLE", "super_res: the side of the averaged pixel blocks"),
    Flag("blur_sigma", 1.0, S, "SAMPLE", "deblur: the Gaussian kernel's standard deviation, in pixels"),
    Flag("blur_size", 5, S, "SAMPLE", "deblur: the kernel's side, odd"),
    Flag("num_samples_per_input", 1, S, "SAMPLE", "restorations drawn for each input image"),
    Flag("output", "", S, "SAMPLE", "the file to write"),
    Flag("grid_size", 100, S, "SAMPLE", "candidate timesteps of the search's reference trajectory"),
    Flag("refine_rounds", 2, S, "SAMPLE", "rounds of moving one timestep at a time while the error falls"),
    # ------------------------------------------------------------ CLASSIFIER
    Flag("classifier_path", "", S, "CLASSIFIER", "a classifier checkpoint of classifier_train.py (modelNNNNNN.pt)"),
    Flag("classifier_scale", 1.0, S, "CLASSIFIER", "classifier guidance scale (0: load but do not guide)"),
    Flag("classifier_use_fp16", False, T, "CLASSIFIER", "float16 classifier torso (CUDA only)"),
    Flag("classifier_width", 128, A, "CLASSIFIER", "width of the classifier's first level"),
    Flag("classifier_depth", 2, A, "CLASSIFIER", "residual blocks per level of the classifier"),
    Flag("classifier_attention_resolutions", "32,16,8", A, "CLASSIFIER",
         "resolutions whose classifier blocks get self-attention"),
    Flag("classifier_use_scale_shift_norm", True, A, "CLASSIFIER", "FiLM timestep embedding in the classifier"),
    Flag("classifier_resblock_updown", True, A, "CLASSIFIER", "residual blocks that downsample in the classifier"),
    Flag("classifier_pool", "attention", A, "CLASSIFIER",
         "the classifier's pooling head: adaptive, attention, spatial or spatial_v2"),
)

del A, P, T, S

# ---------------------------------------------------------------- the flag sets

# The reference's model_and_diffusion_defaults() and the flags this library
# added to it, in that dict's order.
MODEL_AND_DIFFUSION = (
    "image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample", "attention_resolutions",
    "dropout", "learn_sigma", "sigma_small", "class_cond", "diffusion_steps", "noise_schedule",
    "timestep_respacing", "use_kl", "predict_xstart", "predict_v", "snr_gamma", "rescale_zero_terminal_snr",
    "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm", "channel_mult",
    "num_classes", "num_head_channels", "resblock_updown", "use_new_attention_order", "use_fp16",
    "class_dropout_prob", "image_channels",
)
# The super-resolution model's: large_size and small_size for image_size, no sigma_small.
SR_MODEL_AND_DIFFUSION = ("large_size", "small_size") + tuple(
    name for name in MODEL_AND_DIFFUSION if name not in ("image_size", "sigma_small")
)
# guided-diffusion's diffusion_defaults(): the diffusion flags above, in their order.
DIFFUSION = (
    "learn_sigma", "sigma_small", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
    "predict_xstart", "predict_v", "snr_gamma", "rescale_zero_terminal_snr", "rescale_timesteps",
    "rescale_learned_sigmas",
)
CLASSIFIER = (
    "image_size", "classifier_use_fp16", "classifier_width", "classifier_depth",
    "classifier_attention_resolutions", "classifier_use_scale_shift_norm", "classifier_resblock_updown",
    "classifier_pool",
)
# The model flags of the scripts beyond the defaults dicts above (which keep the reference's contents).
MODEL_EXTRAS = (
    "null_label", "objective", "continuous_timesteps", "sigma_data", "sigma_min", "sigma_max", "P_mean", "P_std",
    "logit_mean", "logit_std", "time_sampling",
)

# The flags of a run that fix which noise level a timestep means: a classifier
# guides only a model whose run had the same values.
NOISE_LEVEL = ("diffusion_steps", "noise_schedule", "rescale_timesteps", "rescale_zero_terminal_snr")

DIFFUSION_TRAINING = (
    "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch",
    "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16", "fp16_scale_growth", "seed",
    "max_steps", "use_bf16", "random_flip", "random_crop", "keep_checkpoints", "max_bad_steps",
    "allow_partial_resume", "check_replicas", "num_workers", "allow_mixed_channels", "eval_interval", "eval_num_samples", "eval_sampler",
    "eval_timestep_respacing", "inception_weights",
)
# The options of the training core (train_core.py) that every training script takes.
TRAINING_CORE = (
    "ema_std", "ema_snapshot_interval", "grad_clip", "lr_warmup_steps", "save_format", "init_checkpoint",
)
DIFFUSION_TRAINING += TRAINING_CORE
CLASSIFIER_TRAINING = (
    "data_dir", "val_data_dir", "noised", "iterations", "lr", "weight_decay", "anneal_lr", "batch_size",
    "microbatch", "schedule_sampler", "resume_checkpoint", "log_interval", "eval_interval", "save_interval",
    "seed", "num_classes", "image_channels", "allow_partial_resume", "keep_checkpoints",
) + TRAINING_CORE
# What every sampling script adds to its own flags.
COMMON_SAMPLING = ("seed", "use_bf16", "use_fp16", "compile")
SAMPLER = ("sampler", "sample_name", "guidance_scale", "guidance_interval")
IMAGE_SAMPLING = ("clip_denoised", "num_samples", "batch_size", "use_ddim", "model_path", "eta", "class_label",
                  "save_pngs") + SAMPLER + COMMON_SAMPLING
CLASSIFIER_SAMPLING = ("classifier_path", "classifier_scale") + CLASSIFIER[1:]

# Per-script defaults that differ from the table's, with the help that goes with them.
_SAMPLING_SEED = {"seed": (-1, "seed of the samples' noise and labels (-1: random, logged)")}
_SAMPLING = {**_SAMPLING_SEED, "batch_size": (16, "samples per batch on each rank")}
_CLASSIFIER_TRAINING = {
    "lr": (3e-4, None),
    "batch_size": (4, None),
    "eval_interval": (5, "log the val_ metrics of one validation batch every this many steps"),
}

# Each script: (its flag names in parser order, {name: (default, help or None)}).
SCRIPTS = {
    "image_train": (DIFFUSION_TRAINING + MODEL_AND_DIFFUSION + MODEL_EXTRAS, {}),
    "super_res_train": (DIFFUSION_TRAINING + SR_MODEL_AND_DIFFUSION + MODEL_EXTRAS, {}),
    "classifier_train": (CLASSIFIER_TRAINING + CLASSIFIER + DIFFUSION, _CLASSIFIER_TRAINING),
    "image_sample": (IMAGE_SAMPLING + MODEL_AND_DIFFUSION + MODEL_EXTRAS, _SAMPLING),
    "super_res_sample": (
        ("clip_denoised", "base_samples", "num_samples", "batch_size", "use_ddim", "model_path", "eta", "save_pngs")
        + SAMPLER + COMMON_SAMPLING + SR_MODEL_AND_DIFFUSION + MODEL_EXTRAS,
        _SAMPLING,
    ),
    "image_nll": (
        ("data_dir", "clip_denoised", "num_samples", "batch_size", "model_path") + COMMON_SAMPLING
        + MODEL_AND_DIFFUSION + MODEL_EXTRAS,
        {**_SAMPLING_SEED, "data_dir": ("", "folder of images to evaluate"), "num_samples": (1000, "images to evaluate"),
         "batch_size": (1, "images per batch")},
    ),
    "classifier_sample": (
        IMAGE_SAMPLING + CLASSIFIER_SAMPLING + MODEL_AND_DIFFUSION + MODEL_EXTRAS,
        {**_SAMPLING, "num_classes": (-1, "classes of the labels (-1: the model's, else the classifier's)")},
    ),
    "search_timesteps": (
        ("model_path", "sampler", "steps", "output", "grid_size", "refine_rounds", "clip_denoised", "num_samples",
         "batch_size", "class_label") + COMMON_SAMPLING + MODEL_AND_DIFFUSION + MODEL_EXTRAS,
        {**_SAMPLING_SEED, "sampler": ("dpmpp_2m", "the deterministic sampler to search timesteps for"),
         "output": ("steps.json", "the JSON file to write (for --timestep_respacing)"),
         "num_samples": (8, "samples of the search's batch"), "batch_size": (8, "samples per batch")},
    ),
    "image_eval": (
        ("ref", "samples", "inception_weights", "batch_size", "output", "ref_stats"),
        {"batch_size": (64, "images per forward of the network"),
         "output": ("", "the JSON to write (default: SAMPLES_eval.json beside SAMPLES)")},
    ),
    "reconstruct_ema": (
        ("log_dir", "ema_std", "step"),
        {"ema_std": ("", 'sigma_rel of the EMA to build, comma-separated for several (e.g. "0.05,0.08")')},
    ),
    "image_restore": (
        ("model_path", "input", "task", "mask", "method", "sampler", "eta", "t_start", "dps_scale", "jump_length",
         "jump_n_sample", "sigma_y", "super_res_factor", "blur_sigma", "blur_size", "num_samples_per_input",
         "clip_denoised", "batch_size", "class_label", "sample_name") + COMMON_SAMPLING + MODEL_AND_DIFFUSION
        + MODEL_EXTRAS,
        {**_SAMPLING, "sampler": ("ddim", "the sampler (which ones each --method takes: README, Restoration)"),
         "sample_name": ("", "stem of the output files (default: restored)")},
    ),
    "convert_checkpoint": (("in_path", "out_path"), {}),
    "plot_progress": (
        ("logdir", "output", "keys"),
        {"output": ("", "the PNG to write (default: LOGDIR/progress.png)")},
    ),
}


def script_flags(script):
    """The Flag records of `script` (a key of SCRIPTS), in parser order, with its own defaults."""
    names, overrides = SCRIPTS[script]
    flags = []
    for name in dict.fromkeys(names):  # a name in two of the sets it is made of counts once, where it comes first
        flag = FLAGS[name]
        if name in overrides:
            flag = flag.with_default(*overrides[name])
        flags.append(flag)
    return flags


def defaults(names):
    """{name: default} of the table's flags `names`, in that order."""
    return {name: FLAGS[name].default for name in names}


def script_defaults(script):
    """{name: default} of every optional flag of `script`."""
    return {flag.name: flag.default for flag in script_flags(script) if not flag.positional}


def names_of_kind(names, *kinds):
    """The names among `names` whose flags are of one of `kinds`."""
    return [name for name in names if FLAGS[name].kind in kinds]


# ---------------------------------------------------------------- parsing


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `error: ...`, and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _shown(value):
    return '""' if value == "" else str(value)


def parser_for(script, description=None):
    """The parser of a script: its flags grouped under GROUPS' headings, each with its help text and default."""
    return build_parser(script_flags(script), f"{script}.py", description)


def build_parser(flags, prog=None, description=None):
    """A FlagParser of these Flag records (see parser_for)."""
    parser = FlagParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for group in GROUPS:
        members = [flag for flag in flags if flag.group == group]
        if members:
            groups[group] = parser.add_argument_group(f"{group} flags")
    for flag in flags:
        extra = {"choices": flag.choices} if flag.choices else {}
        if flag.positional:
            groups[flag.group].add_argument(flag.name, type=flag.parse_type(), help=flag.help, **extra)
            continue
        fixed = f"{flag.kind}, " if flag.kind in CHECKPOINT_KINDS else ""
        only = f"{'/'.join(flag.objectives)} only, " if flag.objectives else ""
        others = "".join(f"; {name}: {_shown(value)}" for name, value in (flag.per_objective or {}).items())
        groups[flag.group].add_argument(
            f"--{flag.name}", default=flag.default, type=flag.parse_type(), metavar=flag.name.upper(),
            help=f"{flag.help} [{only}{fixed}default: {_shown(flag.default)}{others}]", **extra,
        )
    return parser


class _Unset:
    """Marks a flag the command line did not give."""


def parse(script, argv=None, description=None):
    """
    Parse a script's command line.

    :return: (args, explicit): the argparse.Namespace, and the set of flag
        names given on the command line (as opposed to taken from defaults).
    """
    return parse_with(script_flags(script), argv, f"{script}.py", description)


def parse_with(flags, argv=None, prog=None, description=None):
    """parse() over these Flag records."""
    parser = build_parser(flags, prog, description)
    args = parser.parse_args(argv)
    optional = [flag.name for flag in flags if not flag.positional]
    parser.set_defaults(**{name: _Unset for name in optional})
    given = parser.parse_args(argv)
    return args, {name for name in optional if getattr(given, name) is not _Unset}


# ---------------------------------------------------------------- objectives


def applies(name, objective):
    """Whether flag `name` applies to `objective` (Flag.objectives)."""
    return not FLAGS[name].objectives or objective in FLAGS[name].objectives


def objective_conflicts(objective, explicit):
    """
    ["--flag", ...]: the flags among the given ones (`explicit`, names) that
    do not apply to `objective`, in the table's order.
    """
    return [f"--{name}" for name in FLAGS if name in explicit and not applies(name, objective)]


def check_objective(objective, explicit, source=None):
    """
    UsageError naming each given flag (`explicit`) that does not apply to
    `objective`; `source` says where the objective came from (default: --objective).
    """
    conflicts = objective_conflicts(objective, explicit)
    if not conflicts:
        return
    where = source or f"--objective {objective}"
    own = ", ".join(f"--{name}" for name in objective_flags(objective)) or "none"
    raise UsageError(
        f"{', '.join(conflicts)} {'does' if len(conflicts) == 1 else 'do'} not apply to {where}: drop "
        f"{'it' if len(conflicts) == 1 else 'them'} ({objective}'s own flags: {own})"
    )


def objective_flags(objective):
    """The names of the flags that apply to `objective` alone (--sigma_data for edm, ...)."""
    return [name for name, flag in FLAGS.items() if flag.objectives == (objective,)]


def apply_objective_defaults(values, explicit, objective):
    """
    In the dict `values`, put each flag's default under `objective`
    (Flag.per_objective) in place of the table's, for the flags not given
    (`explicit`). Returns `values`.
    """
    for name in values:
        if name in FLAGS and name not in explicit:
            flag = FLAGS[name]
            if flag.per_objective and values[name] == flag.default:
                values[name] = flag.default_for(objective)
    return values


# ---------------------------------------------------------------- checks against a checkpoint's flags


def contradictions(given, saved, names, explicit=None):
    """
    ["--flag X (trained with Y)", ...] for each flag among `names` of a
    checkpoint kind (CHECKPOINT_KINDS) whose value in `given` differs from the
    run's `saved` one; with `explicit`, only those flags count (the others
    are taken from `saved`).
    """
    return [
        f"--{name} {given[name]} (trained with {saved[name]!r})"
        for name in names_of_kind(names, *CHECKPOINT_KINDS)
        if name in saved and name in given and (explicit is None or name in explicit) and given[name] != saved[name]
    ]
