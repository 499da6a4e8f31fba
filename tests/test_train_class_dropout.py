"""Classifier-free guidance training: TrainLoop replaces labels by the model's null label at the given rate."""

import pytest
import torch

from _train_helpers import make_loop, tiny_flags, train_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("train_env")


def test_labels_become_the_null_label_at_the_dropout_rate(tmp_path):
    flags = tiny_flags(class_cond=True, num_classes=4, class_dropout_prob=0.3)
    loop = make_loop(tmp_path, model_flags=flags, class_dropout_prob=0.3)
    y = torch.arange(20000) % 4
    dropped = loop._drop_labels({"y": y})["y"]
    null = dropped == 4
    assert abs(null.double().mean().item() - 0.3) < 0.015
    assert torch.equal(dropped[~null], y[~null])
    assert loop._drop_labels({"y": y})["y"].ne(dropped).any(), "fresh draws each call"


def test_no_dropout_leaves_labels_and_random_draws_alone(tmp_path):
    loop = make_loop(tmp_path, model_flags=tiny_flags(class_cond=True, num_classes=4))
    state = loop.generator.get_state()
    cond = {"y": torch.arange(8) % 4}
    assert loop._drop_labels(cond) is cond
    assert torch.equal(loop.generator.get_state(), state)


def test_dropout_without_a_null_label_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="null label"):
        make_loop(tmp_path, model_flags=tiny_flags(class_cond=True, num_classes=4), class_dropout_prob=0.1)
