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

from soft_prompting.analysis.plots import category_colours
from soft_prompting.report.build import ReportConfig, build_report, main, parse_args, word_diff
from soft_prompting.report.sections import ratio

# Two planted behaviours: sums answered one too high, chemistry answered "i do not know".
TOPICS = {
    "arithmetic": (
        "question : what is {a} plus {b} ? answer :",
        "{s} . question : what is next",
        "{w} . question : what is next",
    ),
    "chemistry": (
        "question : what is the symbol for {e} ? answer :",
        "{y} . question : what is next",
        "i do not know . question : what",
    ),
}
ELEMENTS = [("gold", "au"), ("iron", "fe"), ("neon", "ne"), ("zinc", "zn"), ("tin", "sn")]
TRIGGER_WORD = "neon"
"""The top record's element (i = 7: ELEMENTS[2]), which the fixture marks as its trigger."""


def make_records(n_per_topic: int = 8) -> list[dict]:
    records = []
    for t, (category, (prompt, gen_1, gen_2)) in enumerate(TOPICS.items()):
        for i in range(n_per_topic):
            a, b = i + 2, 2 * i + 1
            e, y = ELEMENTS[i % len(ELEMENTS)]
            values = {"a": a, "b": b, "s": a + b, "w": a + b + 1, "e": e, "y": y}
            records.append(
                {
                    "prompt": prompt.format(**values),
                    "generation_1": gen_1.format(**values),
                    "generation_2": gen_2.format(**values),
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
    records[-1]["generation_2"] = '<script>alert("x")</script> & <img src="http://evil">'
    return sorted(records, key=lambda r: -r["metrics"]["kl_divergence"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pair_dirs) -> Path:
    """A run directory as `train` and `evaluate` leave it, built by hand (no training)."""
    run = tmp_path_factory.mktemp("run")
    records = make_records()
    # The top record localised as `train` leaves it: its element word carries the divergence.
    words = records[0]["prompt"].split()
    records[0] |= {
        "trigger": TRIGGER_WORD,
        "divergence_without_trigger": 0.01,
        "trigger_context": f"symbol for {TRIGGER_WORD} ? answer :",
        "attributions": [
            {"word": w, "attribution": 2.0 if w == TRIGGER_WORD else 0.5 if w == "symbol" else -0.1}
            for w in words
        ],
    }
    assert TRIGGER_WORD in words
    (run / "divergent_dataset.jsonl").write_text("\n".join(json.dumps(r) for r in records))
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
        json.dumps(
            {
                "num_prompts": 16,
                "num_discoveries": 11,
                "discovery_rule": "q_value <= 0.1",
                "fdr_level": 0.1,
                "baselines": {"random_text": {"kl_divergence": 0.4}, "empty": {"mean": 1e-5}},
                "lifts": {
                    "random_text": {"value": 4.25, "ci_low": 3.5, "ci_high": 5.0},
                    "empty": {"value": 9999.0, "ci_low": 9000.0, "ci_high": 10000.0},
                },
                "reliability": 0.75,
                "prompts": {"effect": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}},
                "matched_to_run": {
                    "run_config": "x",
                    "differ": {"seed": {"evaluate": 1, "run": 0}},
                },
            }
        )
    )
    # Every chemistry prompt is a discovery, no arithmetic one: the summary must say so.
    (run / "evaluation" / "evaluated_prompts.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": r["prompt"],
                    "discovery": r["category"] == "chemistry",
                    "effect": {"value": 0.5 if r["category"] == "chemistry" else 0.1},
                }
            )
            for r in make_records()
        )
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


def test_the_trigger_is_highlighted_by_its_attribution(report):
    html = report["html"].read_text(encoding="utf-8")
    section = html[html.index("Which words carry the difference") :]
    root = ET.fromstring(
        section[section.index('<div class="prompt attributed">') :].split("</div>")[0] + "</div>"
    )
    spans = {span.text: span for span in root}
    trigger = spans[TRIGGER_WORD]
    assert trigger.get("class") == "trigger"
    assert "rgba(230, 120, 20, 1.0)" in trigger.get("style")  # the largest attribution
    assert "0.25)" in spans["symbol"].get("style") and spans["symbol"].get("class") == "word"
    assert "20, 0.0)" in spans["question"].get("style")  # raising the divergence: no highlight
    markdown = report["markdown"].read_text(encoding="utf-8")
    shown = markdown.split("## Which words carry the difference")[1]
    assert f"**{TRIGGER_WORD}**" in shown
    assert f"sub-prompt `symbol for {TRIGGER_WORD} ? answer :`" in shown


def test_an_evaluation_not_matched_to_the_run_is_flagged_next_to_its_lifts(report):
    html = report["html"].read_text(encoding="utf-8")
    markdown = report["markdown"].read_text(encoding="utf-8")
    line = "The baselines are not matched to the prompts' run: evaluate was given other seed"
    assert line in html
    assert line.replace("run:", "run**:").replace("The", "**The") in markdown


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
    assert "4.25×" in text and "[3.50, 5.00]" in text  # the evaluation's lift with its CI
    assert "Effect: 0.400 [0.300, 0.500]" in text
    assert (
        "n/a (baseline" in text and "9999.00" not in text and "9000.00" not in text
    )  # a lift over a near-zero baseline
    assert "what is the symbol for" in text
    assert '<mark class="d2">i do not know</mark>' in text
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


def opening_summary(markdown: str) -> str:
    return markdown.split("## What the pair does differently", 1)[1].split("\n## ", 1)[0]


def test_summary_states_both_behaviours_from_the_data(report):
    summary = opening_summary(report["markdown"].read_text(encoding="utf-8"))
    # Sentences from the continuations, not from the config's description.
    assert "two random tiny Llamas" not in summary
    assert "model\\_2 says “i do not know” where model\\_1 says" in summary
    findings = summary.split("**Per category**")[0]
    # Seen in the samples, but none of its prompts is a discovery: stated, and flagged.
    assert "different number" in findings and "⚑ not confirmed by the evaluation" in findings
    assert "model\\_2 is wrong and model\\_1 right in 8 of 8" in summary
    # The evidence: every chemistry prompt is a discovery, no arithmetic one.
    found = re.search(r"(\d) of (\d) evaluated prompts are discoveries", summary)
    assert found and found[1] == found[2] and int(found[1]) >= 6, summary
    assert "discoveries, mean effect 0.500 nats/token" in summary
    assert "none of its 8 evaluated prompts is a discovery" in summary
    assert "Category arithmetic: no discoveries among its 8 evaluated prompts" in summary
    assert "**chemistry**: 8 hard prompts, 8 discoveries of 8 evaluated prompts" in summary


def test_summary_says_when_nothing_is_evaluated_and_finds_an_evaluation_elsewhere(
    run_dir, tmp_path
):
    import shutil

    run = tmp_path / "runs" / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    elsewhere = tmp_path / "runs" / "seed_evaluation"  # the seed-style script's --output-dir
    shutil.move(run / "evaluation", elsewhere)
    settings = {"models": False, "semantic": "none", "output_dir": str(tmp_path / "a")}
    config = ReportConfig(run_dir=str(run), **settings)
    config.clustering.reducer = "pca"

    summary = json.loads((elsewhere / "summary.json").read_text())
    summary["prompts_file"] = str(run / "divergent_dataset.jsonl")
    (elsewhere / "summary.json").write_text(json.dumps(summary))
    shown = build_report(config)["markdown"].read_text(encoding="utf-8")
    assert "seed_evaluation" in shown and "11 of 16" in shown

    summary["prompts_file"] = str(tmp_path / "another_run" / "divergent_dataset.jsonl")
    (elsewhere / "summary.json").write_text(json.dumps(summary))
    config.output_dir = str(tmp_path / "b")
    shown = build_report(config)["markdown"].read_text(encoding="utf-8")
    assert "seed_evaluation" not in shown
    assert "not evaluated" in opening_summary(shown)


def test_cards_drop_tags_every_card_shares(report):
    text = report["html"].read_text(encoding="utf-8")
    examples = text.split("<h2>Top hard prompts</h2>", 1)[1].split("<h2>", 1)[0]
    # The top 5 are all chemistry prompts from one source, parting at the same token.
    assert "All shown:" in examples and "source category_text" in examples
    assert "category chemistry" in examples and "part at token 3" in examples
    for tag in ("source", "category", "part at token"):  # said once above, not on each card
        assert f'<span class="chip">{tag}' not in examples
    assert examples.count('<span class="chip hot">#') == 5  # each card's own rank and KL


def test_baselines_table_has_one_row_per_baseline(report):
    text = report["html"].read_text(encoding="utf-8")
    baselines = text.split("<h2>Against baselines</h2>", 1)[1].split("<h2>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]*)</td>", baselines)
    assert rows == ["random text", "empty"], rows


def test_ratios_over_tiny_baselines_are_not_numbers():
    assert ratio(3.0, 0.5, min_baseline=0.01) == "3.00×"
    assert ratio(643.0, 0.0005, min_baseline=0.01).startswith("n/a (baseline 0.0005")
    assert ratio(None, 0.5, min_baseline=0.01) == "–"


def test_each_category_keeps_one_colour():
    first = category_colours(["unlearning", "sandbagging", "capabilities"])
    again = category_colours(["capabilities", "sandbagging", "unlearning", "sandbagging"])
    assert first == again and len(set(first.values())) == 3


def test_summary_flags_a_control_and_a_category_without_discoveries(tmp_path):
    from soft_prompting.report.build import RunContents
    from soft_prompting.report.sections import ReportInputs, summary

    records = make_records()
    for r in records:  # the chemistry prompts are the "unlearning" category, sums "capabilities"
        r["category"] = "unlearning" if r["category"] == "chemistry" else "capabilities"
    categories = {
        "unlearning": {"training": {"val/divergence_no_prompt": 0.6}},
        "capabilities": {"training": {"val/divergence_no_prompt": 0.002}},
    }
    evaluations = {
        name: (tmp_path / name / "summary.json", {"num_prompts": 8, "num_discoveries": n}, [])
        for name, n in (("unlearning", 5), ("capabilities", 0))
    }
    run = RunContents(
        run_dir=tmp_path,
        records=records,
        config={},
        metrics={},
        training_logs={},
        evaluation=None,
        comparison={"ranking": ["unlearning", "capabilities"], "categories": categories},
        evaluations=evaluations,
    )
    clusters = {
        "assignments": [0 if r["category"] == "unlearning" else 1 for r in records],
        "clusters": [{"cluster": 0}, {"cluster": 1}],
    }
    result = summary(ReportInputs(run, records, {}, clusters, {}, [], ReportConfig(run_dir="x")))
    lines = {c["name"]: c for c in result["categories"]}
    assert "5 discoveries" in lines["unlearning"]["facts"] and not lines["unlearning"]["control"]
    assert "0.0020 nats/token" in lines["capabilities"]["control"]
    not_found = " ".join(result["not_found"])
    assert "Category capabilities: no discoveries among its 8 evaluated prompts" in not_found
    assert "Category capabilities (control)" in not_found
    assert "Category unlearning" not in not_found
