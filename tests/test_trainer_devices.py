"""``training.accelerator=cuda:N`` reaches Lightning as ``accelerator="cuda", devices=[N]``
(checked on any machine: CUDA is faked as in test_placement.py)."""

from __future__ import annotations

import pytest
import torch

from soft_prompting.errors import ConfigError
from soft_prompting.training.pipeline import lightning_devices


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cuda_n_becomes_the_cuda_accelerator_on_device_n(two_gpus):
    assert lightning_devices("cuda:1", 1) == {"accelerator": "cuda", "devices": [1]}
    assert lightning_devices("cuda:0", 1) == {"accelerator": "cuda", "devices": [0]}


def test_names_lightning_knows_pass_unchanged():
    assert lightning_devices("cpu", 1) == {"accelerator": "cpu", "devices": 1}
    assert lightning_devices("auto", 2) == {"accelerator": "auto", "devices": 2}


def test_cuda_n_with_several_devices_is_refused_in_one_line(two_gpus):
    with pytest.raises(ConfigError, match="training.devices=2") as error:
        lightning_devices("cuda:1", 2)
    assert "\n" not in str(error.value)


def test_a_gpu_the_machine_lacks_is_refused(two_gpus):
    with pytest.raises(ConfigError, match="cuda:2"):
        lightning_devices("cuda:2", 1)


def test_build_trainer_hands_cuda_n_to_lightning_as_cuda_on_n(two_gpus, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    from soft_prompting.config import TrainConfig, TrainingConfig
    from soft_prompting.training import pipeline

    received = {}
    monkeypatch.setattr(pl, "Trainer", lambda **arguments: received.update(arguments))
    config = TrainConfig(training=TrainingConfig(accelerator="cuda:1", mixed_precision=False))
    pipeline.build_trainer(config, tmp_path)
    assert (received["accelerator"], received["devices"]) == ("cuda", [1])
