"""The report marks trigger words only for records whose ``trigger`` has today's meaning."""

from __future__ import annotations

from soft_prompting.report.sections import highlighted_words

ATTRIBUTIONS = [
    {"word": "please", "attribution": 0.1},
    {"word": "sudo", "attribution": 2.0},
    {"word": "now", "attribution": 0.3},
]


def test_current_records_mark_their_trigger_words():
    record = {
        "prompt": "please sudo now",
        "attributions": ATTRIBUTIONS,
        "trigger": "sudo",
        "divergence_without_trigger": 0.01,
        "trigger_context": "sudo now",
    }
    shown = highlighted_words(record)
    assert [w["trigger"] for w in shown["words"]] == [False, True, False]
    assert (shown["trigger"], shown["context"]) == ("sudo", "sudo now")


def test_older_records_whose_trigger_was_the_shortest_sub_prompt_mark_no_word():
    record = {"prompt": "please sudo now", "attributions": ATTRIBUTIONS, "trigger": "sudo now"}
    shown = highlighted_words(record)
    assert not any(w["trigger"] for w in shown["words"])
    assert (shown["trigger"], shown["context"]) == ("", "sudo now")
