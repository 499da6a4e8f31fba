"""
The public names that notebooks and forks import from openai/improved-diffusion's
modules (and the guided-diffusion names of SPEC 13) exist here, with the
reference's meaning for the ones this library added for compatibility.

Left out on purpose (SPEC replaces them): nn.CheckpointFunction (checkpointing
is torch.utils.checkpoint) and TrainLoop.optimize_fp16 / optimize_normal (the
float16 master-weight steps; use_fp16 is autocast with a loss scale).
"""

import inspect

import numpy as np
import pytest
import torch
from _train_helpers import write_images

from improved_diffusion import (
    dist_util,
    fp16_util,
    gaussian_diffusion,
    image_datasets,
    logger,
    losses,
    nn,
    resample,
    respace,
    script_util,
    train_util,
    unet,
)

REFERENCE_NAMES = {
    dist_util: "GPUS_PER_NODE SETUP_RETRY_COUNT setup_dist dev load_state_dict sync_params",
    fp16_util: "convert_module_to_f16 convert_module_to_f32 make_master_params model_grads_to_master_grads "
               "master_params_to_model_params unflatten_master_params zero_grad",
    gaussian_diffusion: "get_named_beta_schedule betas_for_alpha_bar ModelMeanType ModelVarType LossType "
                        "GaussianDiffusion",
    image_datasets: "load_data ImageDataset",
    logger: "KVWriter SeqWriter HumanOutputFormat JSONOutputFormat CSVOutputFormat TensorBoardOutputFormat "
            "make_output_format mpi_weighted_mean get_rank_without_mpi_import "
            "logkv logkv_mean logkvs dumpkvs getkvs log debug info warn error set_level set_comm get_dir "
            "record_tabular dump_tabular profile_kv profile get_current Logger configure reset "
            "scoped_configure DEBUG INFO WARN ERROR DISABLED",
    losses: "normal_kl approx_standard_normal_cdf discretized_gaussian_log_likelihood",
    nn: "SiLU GroupNorm32 conv_nd linear avg_pool_nd update_ema zero_module scale_module mean_flat "
        "normalization timestep_embedding checkpoint",
    resample: "create_named_schedule_sampler ScheduleSampler UniformSampler LossAwareSampler "
              "LossSecondMomentResampler",
    respace: "space_timesteps SpacedDiffusion",
    script_util: "NUM_CLASSES model_and_diffusion_defaults create_model_and_diffusion create_model "
                 "sr_model_and_diffusion_defaults sr_create_model_and_diffusion sr_create_model "
                 "create_gaussian_diffusion add_dict_to_argparser args_to_dict str2bool",
    train_util: "INITIAL_LOG_LOSS_SCALE TrainLoop parse_resume_step_from_filename get_blob_logdir "
                "find_resume_checkpoint find_ema_checkpoint log_loss_dict",
    unet: "TimestepBlock TimestepEmbedSequential Upsample Downsample ResBlock AttentionBlock QKVAttention "
          "UNetModel SuperResModel "
          # guided-diffusion's names of the UNet family (SPEC 13)
          "QKVAttentionLegacy count_flops_attn convert_module_to_f16 convert_module_to_f32 AttentionPool2d "
          "EncoderUNetModel",
}
# guided-diffusion's script_util names of the UNet family and its classifiers (SPEC 12, 13).
GUIDED_SCRIPT_UTIL_NAMES = ("diffusion_defaults classifier_defaults classifier_and_diffusion_defaults "
                            "create_classifier create_classifier_and_diffusion")

REFERENCE_METHODS = {
    gaussian_diffusion.GaussianDiffusion: "q_mean_variance q_sample q_posterior_mean_variance p_mean_variance "
    "p_sample p_sample_loop p_sample_loop_progressive ddim_sample ddim_reverse_sample ddim_sample_loop "
    "ddim_sample_loop_progressive training_losses calc_bpd_loop",
    respace.SpacedDiffusion: "p_mean_variance training_losses",
    train_util.TrainLoop: "run_loop run_step forward_backward log_step save",
    unet.UNetModel: "convert_to_fp16 convert_to_fp32 forward get_feature_vectors inner_dtype",
    unet.QKVAttention: "count_flops",
    unet.QKVAttentionLegacy: "count_flops",
    resample.LossAwareSampler: "update_with_local_losses update_with_all_losses",
}

# Constructor arguments of the reference's (and guided-diffusion's) blocks, in the reference's order.
REFERENCE_ARGUMENTS = {
    unet.UNetModel: "in_channels model_channels out_channels num_res_blocks attention_resolutions dropout "
    "channel_mult conv_resample dims num_classes use_checkpoint num_heads num_heads_upsample "
    "use_scale_shift_norm",
    unet.ResBlock: "channels emb_channels dropout out_channels use_conv use_scale_shift_norm dims use_checkpoint",
    unet.AttentionBlock: "channels num_heads use_checkpoint",
}
GUIDED_ARGUMENTS = {
    unet.UNetModel: "num_head_channels resblock_updown use_new_attention_order use_fp16 image_size",
    unet.ResBlock: "up down",
    unet.AttentionBlock: "num_head_channels use_new_attention_order",
}


@pytest.mark.parametrize("module", list(REFERENCE_NAMES), ids=lambda m: m.__name__.split(".")[-1])
def test_reference_module_names_exist(module):
    missing = [name for name in REFERENCE_NAMES[module].split() if not hasattr(module, name)]
    assert not missing, f"{module.__name__} lacks {missing}"


def test_guided_diffusion_script_util_names_exist():
    missing = [name for name in GUIDED_SCRIPT_UTIL_NAMES.split() if not hasattr(script_util, name)]
    assert not missing, f"script_util lacks {missing}"


def test_reference_methods_exist():
    for cls, names in REFERENCE_METHODS.items():
        missing = [name for name in names.split() if not hasattr(cls, name)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_constructor_arguments_keep_the_reference_order_and_take_guided_diffusions():
    for cls, names in REFERENCE_ARGUMENTS.items():
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        assert params[: len(names.split())] == names.split(), cls.__name__
        assert set(GUIDED_ARGUMENTS[cls].split()) <= set(params), cls.__name__


@pytest.mark.parametrize("name, step", [
    ("/runs/a/model000123.pt", 123), ("model1000000.pt", 1000000), ("ema_0.9999_000100.pt", 0),
    ("opt000100.pt", 0), ("/runs/model/weights.pt", 0),
])
def test_parse_resume_step_from_filename(name, step):
    assert train_util.parse_resume_step_from_filename(name) == step


def test_find_ema_checkpoint(tmp_path):
    main = tmp_path / "model000020.pt"
    (tmp_path / "ema_0.99_000020.pt").write_bytes(b"")
    assert train_util.find_ema_checkpoint(str(main), 20, 0.99) == str(tmp_path / "ema_0.99_000020.pt")
    assert train_util.find_ema_checkpoint(str(main), 20, 0.9999) is None
    assert train_util.find_ema_checkpoint(None, 20, 0.99) is None


def test_blob_logdir_and_resume_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_BLOB_LOGDIR", str(tmp_path))
    assert train_util.get_blob_logdir() == str(tmp_path)
    assert train_util.find_resume_checkpoint() is None
    for name in ("model000004.pt", "state000004.pt", "model000008.pt"):
        (tmp_path / name).write_bytes(b"")
    assert train_util.find_resume_checkpoint().endswith("model000004.pt")


def test_log_loss_dict_logs_means_and_quartiles(tmp_path):
    diffusion = script_util.create_gaussian_diffusion(steps=100)
    logger.configure(dir=str(tmp_path), format_strs=[])
    try:
        ts = torch.tensor([0, 10, 60, 99])
        train_util.log_loss_dict(diffusion, ts, {"mse": torch.tensor([1.0, 3.0, 5.0, 7.0])})
        logged = dict(logger.getkvs())
    finally:
        logger.reset()
    assert logged == pytest.approx({"mse": 4.0, "mse_q0": 2.0, "mse_q2": 5.0, "mse_q3": 7.0})


def test_image_dataset_shards_and_preprocesses_as_load_data(tmp_path):
    folder = write_images(tmp_path / "images", 5, size=12)
    paths = sorted(str(p) for p in folder.glob("*.png"))
    dataset = image_datasets.ImageDataset(8, paths, classes=[0, 1, 2, 3, 4], shard=1, num_shards=2)
    assert len(dataset) == 2
    image, out = dataset[1]
    assert image.shape == (3, 8, 8) and image.dtype == np.float32
    assert out["y"] == 3 and out["y"].dtype == np.int64
    expected = image_datasets.load_image(paths[3], 8).transpose(2, 0, 1) / np.float32(127.5) - 1
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image_datasets.ImageDataset(8, paths)[0][1] == {}


def test_a_rank_without_local_rank_takes_the_gpu_of_rank_modulo_gpus_per_node(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", str(dist_util.GPUS_PER_NODE + 3))
    assert dist_util._local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_util._local_rank() == 1
