"""Steps that can take minutes say what they are doing: organism builds print step i/N with the
time elapsed and left (measured, not assumed), the benchmark's memory stage one line per child."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import types

from soft_prompting import benchmark
from soft_prompting.organisms import builder


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_build_progress_lines_come_early_then_periodically_with_a_measured_estimate(
    monkeypatch, caplog
):
    clock = FakeClock()
    monkeypatch.setattr(builder, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    caplog.set_level(logging.INFO, logger=builder.logger.name)
    progress = builder._StepProgress("organism:x training", total=100)
    for step in range(1, 101):
        clock.now += 2.0 if step <= 50 else 4.0  # the machine gets loaded half-way
        progress.update(step)
    lines = [r.getMessage() for r in caplog.records]
    # The first line once the speed is measured (3 s), then every 10 s, and the last step.
    assert lines[0] == "organism:x training: step 2/100, 4 s elapsed, ~196 s left"
    assert lines[1] == "organism:x training: step 7/100, 14 s elapsed, ~186 s left"
    assert lines[-1] == "organism:x training: step 100/100, 300 s elapsed, ~0 s left"
    assert len(lines) == 28
    # Each estimate holds at the speed of the moment: elapsed + left is the true total, 300 s,
    # once the slow-down is measured (a fixed guess would stay at 200).
    numbers = [tuple(map(int, re.findall(r"\d+", line)[-2:])) for line in lines]
    assert [elapsed + left for elapsed, left in numbers[:10]] == [200] * 10
    assert [elapsed + left for elapsed, left in numbers[11:]] == [300] * 17


def test_build_progress_is_shown_in_a_python_session_without_logging_set_up(monkeypatch, capfd):
    monkeypatch.setattr(builder.logger, "propagate", False)  # no handler above: a bare session
    assert not builder.logger.hasHandlers()
    with builder._progress_shown():
        builder.logger.info("organism:x training: step 1/2")
    builder.logger.info("after the build")
    assert capfd.readouterr().err == "organism:x training: step 1/2\n"
    assert not builder.logger.handlers


def test_benchmark_memory_stage_prints_a_line_per_child(monkeypatch):
    def child(command, **kwargs):
        variant = command[command.index("--_memory-child") + 1]
        peak = {"train": 471.6, "gen": 415.2}[variant]
        return subprocess.CompletedProcess(command, 0, json.dumps({"peak_rss_mb": peak}), "")

    monkeypatch.setattr(benchmark.subprocess, "run", child)
    lines: list[str] = []
    settings = benchmark.preset_settings("tiny", "cpu")
    results = benchmark.measure_memory_in_children(settings, ["train", "gen"], lines.append)
    assert results["gen"]["peak_rss_mb"] == 415.2
    assert lines[0] == "memory 1/2: train in a child process…"
    assert lines[1].startswith("memory 1/2: train peak RSS 472 MB (")
    assert lines[2] == "memory 2/2: gen in a child process…"
    assert lines[3].startswith("memory 2/2: gen peak RSS 415 MB (")
