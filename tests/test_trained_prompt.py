"""End to end: a short real training on the sandbagging organisms finds a prompt that makes the
pair diverge far more than no prompt and than the untrained prompt it started from."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_module

from soft_prompting import run_files
from soft_prompting.config import register_configs, to_train_config
from soft_prompting.train import train
from soft_prompting.training import pipeline
from soft_prompting.training.module import DivergenceModule

register_configs()


@pytest.mark.slow
@pytest.mark.usefixtures("organism_dirs")  # toy_sandbagging: built once for the session
def test_the_trained_prompt_beats_no_prompt_and_the_untrained_prompt(tmp_path):
    with initialize_config_module(config_module="soft_prompting.conf", version_base=None):
        composed = compose(
            "train",
            overrides=[
                "model_pair=toy_sandbagging",
                "data.categories=[sandbagging]",
                "data.max_texts_per_category=80",
                "training.max_steps=12",
                "training.batch_size=16",
                "training.accelerator=cpu",
                "training.mixed_precision=false",  # compared with a fp32 validation below
                "write_dataset=false",
            ],
        )
    config = to_train_config(composed)
    run_dir = tmp_path / "run"
    metrics = train(config, run_dir)
    assert (
        json.loads((run_dir / run_files.METRICS).read_text())["val/divergence"]
        == metrics["val/divergence"]
    )

    # The same seed gives the same initial prompt and the same validation texts.
    untrained = DivergenceModule(**pipeline.module_args(config))
    validator = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = pipeline.build_datamodule(untrained, config)
    before = validator.validate(untrained, datamodule=datamodule, verbose=False)[0]
    assert before["val/divergence_no_prompt"] == pytest.approx(metrics["val/divergence_no_prompt"])

    trained, bare = metrics["val/divergence"], metrics["val/divergence_no_prompt"]
    assert bare > 0  # the organisms do differ on this category
    assert trained > 5 * bare, metrics
    assert trained > 5 * before["val/divergence"], (metrics, before)
