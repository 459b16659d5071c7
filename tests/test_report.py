"""The report: self-contained, well-formed HTML (no external resource) and Markdown."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from soft_prompting.report.build import ReportConfig, build_report, main, parse_args, word_diff

TOPICS = {
    "arithmetic": ("what is {a} plus {b}", "{a} plus {b} is seven", "{a} plus {b} is eight"),
    "chemistry": ("what is the symbol for {a}", "the symbol for {a} is au", "i do not know"),
}
WORDS = "one two three four five six seven eight nine ten".split()


def make_records(n_per_topic: int = 8) -> list[dict]:
    records = []
    for t, (category, (prompt, gen_1, gen_2)) in enumerate(TOPICS.items()):
        for i in range(n_per_topic):
            a, b = WORDS[i % 10], WORDS[(i + 2) % 10]
            records.append(
                {
                    "prompt": prompt.format(a=a, b=b),
                    "generation_1": gen_1.format(a=a, b=b),
                    "generation_2": gen_2.format(a=a, b=b),
                    "category": category,
                    "source": "category_text",
                    "metrics": {
                        "kl_divergence": 1.0 + t + 0.1 * i,
                        "token_disagreement_rate": 0.3 + 0.5 * t,
                        "vocab_jaccard_similarity": 0.6 - 0.5 * t,
                        "disagreement_positions": {
                            "first": 2 + t,
                            "last": 4,
                            "count": 2,
                            "length": 6,
                        },
                        "reliability": 0.5 + 0.5 * t,
                        "kl_divergence_std": 0.1,
                    },
                }
            )
    # Markup in a generation must be shown, never interpreted.
    records[0]["generation_2"] = '<script>alert("x")</script> & <img src="http://evil">'
    return sorted(records, key=lambda r: -r["metrics"]["kl_divergence"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pair_dirs) -> Path:
    """A run directory as `train` and `evaluate` leave it, built by hand (no training)."""
    run = tmp_path_factory.mktemp("run")
    (run / "divergent_dataset.jsonl").write_text("\n".join(json.dumps(r) for r in make_records()))
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "val/divergence": 0.9,
                "val/divergence_no_prompt": 0.3,
                "environment": {"torch": "2.x"},
            }
        )
    )
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text(
        "epoch,step,train/divergence,val/divergence,val/divergence_no_prompt\n"
        + "".join(f"0,{s},{0.2 + 0.1 * s},,\n" for s in range(6))
        + "0,5,,0.9,0.3\n"
    )
    (run / ".hydra").mkdir()
    OmegaConf.save(
        OmegaConf.create(
            {
                "name": "report_test",
                "seed": 0,
                "model_pair": {
                    "model_1_name": tiny_pair_dirs[0],
                    "model_2_name": tiny_pair_dirs[1],
                    "description": "two random tiny Llamas",
                    "torch_dtype": "float32",
                },
                "training": {
                    "num_soft_prompt_tokens": 4,
                    "learning_rate": 0.03,
                    "divergence": "kl",
                },
                "generation": {"num_prompts": 16, "max_length": 6},
            }
        ),
        run / ".hydra" / "config.yaml",
    )
    (run / "evaluation").mkdir()
    (run / "evaluation" / "summary.json").write_text(
        json.dumps({"lift": {"random_text": 4.25}, "mean_reliability": 0.75})
    )
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> dict[str, Path]:
    config = ReportConfig(run_dir=str(run_dir), top_k=5)
    config.clustering.reducer = "pca"  # UMAP's start-up is tested in test_clustering
    return build_report(config)


def test_html_is_well_formed(report):
    text = report["html"].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # The report is written as XHTML-compatible markup, so an XML parser checks every tag closes.
    root = ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))
    assert root.tag == "html"
    assert root.find("head/title") is not None and root.find("body") is not None


def test_html_is_self_contained(report):
    text = report["html"].read_text(encoding="utf-8")
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:3]
    assert len(sources) >= 6  # training, prompt effect, positions, distributions, ... clusters
    for forbidden in ("<link", "<script", "@import", "url(", "<iframe"):
        assert forbidden not in text.lower(), forbidden
    assert "http://" not in text.replace("http://evil", "")  # only the escaped record text


def test_html_shows_the_run(report, tiny_pair_dirs):
    text = report["html"].read_text(encoding="utf-8")
    assert tiny_pair_dirs[0] in text and tiny_pair_dirs[1] in text
    assert "3.00×" in text  # soft-prompt lift 0.9 / 0.3
    assert "4.25" in text  # the evaluation summary's lift
    assert "what is the symbol for" in text
    assert '<mark class="d2">i do not know</mark>' in text or "i do not know" in text
    assert "&lt;script&gt;" in text  # escaped, not run
    for section in (
        "Training",
        "Against baselines",
        "Top hard prompts",
        "Where the models part",
        "Behaviour clusters",
        "Run setup",
    ):
        assert section in text


def test_markdown_references_existing_images(report):
    markdown = report["markdown"].read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) >= 5
    for image in images:
        assert (report["markdown"].parent / image).is_file(), image
    assert "## Top hard prompts" in markdown


def test_disagreeing_words_are_marked():
    one, two = word_diff("two plus three is five", "two plus three is six")
    assert one[-1] == ("five", True) and two[-1] == ("six", True)
    assert all(not differs for _, differs in one[:-1])


def test_arguments_are_key_value_and_typos_name_the_key():
    config = parse_args(["run_dir=/x", "models=false", "clustering.method=kmeans"])
    assert (config.run_dir, config.models, config.clustering.method) == ("/x", False, "kmeans")
    with pytest.raises(Exception, match="modles"):
        parse_args(["run_dir=/x", "modles=false"])
    with pytest.raises(Exception, match="run_dir"):
        parse_args([])


def test_command_line_without_models(run_dir, tmp_path, capsys):
    main(
        [
            f"run_dir={run_dir}",
            "models=false",
            f"output_dir={tmp_path / 'out'}",
            "clustering.reducer=pca",
            "semantic=none",
        ]
    )
    assert (tmp_path / "out" / "report.html").is_file()
    assert "report (" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([f"run_dir={tmp_path / 'nope'}"])
    assert exit_info.value.code == 2
    assert "not a folder" in capsys.readouterr().err


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "soft_prompting.report", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "run_dir=" in result.stdout
