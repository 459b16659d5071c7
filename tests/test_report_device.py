"""The report's device errors name the report's own option, ``device``."""

from __future__ import annotations

from soft_prompting.report.build import load_pair


def test_a_bad_report_device_is_named_by_the_reports_key():
    config = {"model_pair": {"model_1_name": "m1", "model_2_name": "m2"}}
    pair, why = load_pair(config, "tpu")
    assert pair is None
    assert "device=tpu" in why and "training.accelerator" not in why, why
