"""What model_2 does differently, in words: behaviours read off the records' continuations.

For each group of records (a behaviour cluster) the first span where the two continuations part
(:func:`~soft_prompting.analysis.clustering.first_disagreement`, numbers folded into ``#num``) is
counted: when most of the group parts the same way, model_2 says one phrase ("i do not know"),
answers a different number, or leaves out what model_1 says. Each description carries the
prompts' distinctive words, a representative record and the evaluation's evidence, and a sentence
the report's summary opens with. Plain functions of records: no run directory, no models.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from soft_prompting.analysis.clustering import first_disagreement, normalise_span

BEHAVIOUR_NAMES = {"number": "a different number", "omission": "nothing where model_1 answers"}
"""How the summary names a behaviour that is not one phrase."""
FOUND_SHARE = 0.5
"""A group shows a behaviour when at least this share of its records part the same way."""
SUM = re.compile(r"(\d+)\s*(plus|\+|minus|-|times|x|\*)\s*(\d+)")
TOPIC_STOP_WORDS = frozenset(
    "question answer let us here please next test begin short quiz tell".split()
)
"""Words of the organisms' and most quiz prompts' framing, besides scikit-learn's English stop
words, that never name a topic."""


def last_sentence(prompt: str) -> str:
    """The part of a prompt its continuation answers: after the last full stop."""
    parts = [p for p in re.split(r"\s[.!]\s", f" {prompt} ") if p.strip()]
    return parts[-1].strip() if parts else ""


def _number(node, key: str) -> float | None:
    value = node.get(key) if isinstance(node, dict) else None
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def describe_behaviour(
    members: list[dict], others: list[dict], evaluated: dict[str, dict], cluster: int = 0
) -> dict:
    """What model_2 does differently on ``members``, from the first span where the two part.

    Returns the group's size, the most common model_2 span (numbers folded), what model_1 says
    there, the prompts' distinctive words, a representative record, the evidence and a sentence.
    """
    n = len(members)
    spans = [first_disagreement(r.get("generation_1"), r.get("generation_2")) for r in members]
    differing = [(r, a, b) for r, (a, b) in zip(members, spans, strict=True) if a or b]
    said_2 = Counter(normalise_span(b) for _, _, b in differing)
    phrase, count = said_2.most_common(1)[0] if said_2 else ("", 0)
    matching = [(r, a, b) for r, a, b in differing if normalise_span(b) == phrase]
    numbers = (
        phrase == "#num" and sum(normalise_span(a) == "#num" for _, a, _ in matching) >= 0.8 * count
    )
    kind = "agree" if not differing else "mixed" if count < FOUND_SHARE * n else "phrase"
    if kind == "phrase" and numbers:
        kind = "number"
    elif kind == "phrase" and not phrase:
        kind = "omission"
    said_1 = [a for a, _ in Counter(a for _, a, _ in matching if a).most_common(3)]
    topic = topic_words(members, others)
    example = representative([r for r, _, _ in matching] or members, topic)
    flags = [
        evaluated[str(r.get("prompt"))].get("discovery")
        for r in members
        if str(r.get("prompt")) in evaluated
    ]
    flags = [f for f in flags if isinstance(f, bool)]
    effects = [
        _number(evaluated[str(r.get("prompt"))], "effect")
        for r in members
        if str(r.get("prompt")) in evaluated
    ]
    effects = [e for e in effects if e is not None]
    wrong = arithmetic_errors([r for r, _, _ in matching]) if kind == "number" else None
    kl = [r.get("metrics", {}).get("kl_divergence") for r in members]
    kl = [k for k in kl if isinstance(k, (int, float))]
    behaviour = {
        "cluster": cluster,
        "size": n,
        "kind": kind,
        "count": count,
        "phrase": phrase,
        "model_1_says": said_1,
        "topic": topic,
        "categories": dict(Counter(str(r.get("category")) for r in members).most_common()),
        "mean_kl": float(np.mean(kl)) if kl else None,
        "discoveries": sum(flags) if flags else None,
        "evaluated": len(flags),
        "mean_effect": float(np.mean(effects)) if effects else None,
        "arithmetic": wrong,
        "example": {
            "prompt": example.get("prompt", ""),
            "generation_1": example.get("generation_1", ""),
            "generation_2": example.get("generation_2", ""),
            "span_1": first_disagreement(example.get("generation_1"), example.get("generation_2"))[
                0
            ],
            "span_2": first_disagreement(example.get("generation_1"), example.get("generation_2"))[
                1
            ],
            "category": example.get("category"),
            "kl": example.get("metrics", {}).get("kl_divergence"),
        },
    }
    behaviour["found"], behaviour["why_not"] = _judge(behaviour)
    # The behaviour is seen in the samples either way; the evaluation says whether its prompts
    # beat the baselines (None: not evaluated).
    behaviour["confirmed"] = (
        None if behaviour["discoveries"] is None else behaviour["discoveries"] > 0
    )
    behaviour["sentence"] = behaviour_sentence(behaviour)
    return behaviour


def representative(records: list[dict], topic: list[str]) -> dict:
    """The record that shows a group best: a checked wrong sum first, then the most topic words in
    its last prompt sentence, then the highest KL."""

    def score(r):
        sentence = set(re.findall(r"[a-z]+", last_sentence(str(r.get("prompt", ""))).lower()))
        wrong = arithmetic_errors([r])["model_2_wrong"]
        return (wrong, len(sentence & set(topic)), r.get("metrics", {}).get("kl_divergence") or 0.0)

    return max(records, key=score)


def _judge(b: dict) -> tuple[bool, str]:
    if b["cluster"] < 0:
        return False, "unclustered records (HDBSCAN noise)"
    if b["kind"] == "agree":
        return False, "the two continuations agree"
    if b["kind"] == "mixed":
        return False, (
            f"no consistent difference: its most common change covers only {b['count']} of "
            f"{b['size']} records"
        )
    return True, ""


def behaviour_sentence(b: dict) -> str:
    """One sentence: on which prompts model_2 does what differently, and how often."""
    topic = f"prompts about {', '.join(b['topic'])}" if b["topic"] else "these prompts"
    if b["kind"] == "agree":
        return f"On {topic} the two continuations agree ({b['size']} records)."
    m1 = " / ".join(f"“{s}”" for s in b["model_1_says"]) or "nothing"
    if b["kind"] == "omission":
        return (
            f"On {topic}, model_2 leaves out what model_1 says there ({m1}) in {b['count']} of "
            f"{b['size']} records."
        )
    if b["kind"] == "number":
        ex = b["example"]
        text = (
            f"On {topic}, model_2 answers with a different number than model_1 in {b['count']} "
            f"of {b['size']} records (e.g. model_1 “{ex['span_1']}”, model_2 “{ex['span_2']}”)"
        )
        arithmetic = b["arithmetic"]
        if arithmetic and arithmetic["checked"]:
            text += (
                f"; where the sum could be checked, model_2 is wrong and model_1 right in "
                f"{arithmetic['model_2_wrong']} of {arithmetic['checked']}"
            )
        return text + "."
    if b["kind"] == "mixed":
        return (
            f"On {topic}, model_2's continuation differs from model_1's without one pattern: its "
            f"most common change covers {b['count']} of {b['size']} records."
        )
    return (
        f"On {topic}, model_2 says “{b['phrase']}” where model_1 says {m1} "
        f"({b['count']} of {b['size']} records)."
    )


def topic_words(members: list[dict], others: list[dict], k: int = 3) -> list[str]:
    """Words of the members' last prompt sentences far more common there than in the others'."""

    def shares(records):
        counts = Counter(
            w
            for r in records
            for w in set(re.findall(r"[a-z]+", last_sentence(str(r.get("prompt", ""))).lower()))
            if len(w) > 2 and w not in ENGLISH_STOP_WORDS and w not in TOPIC_STOP_WORDS
        )
        return {w: c / max(1, len(records)) for w, c in counts.items()}

    inside, outside = shares(members), shares(others)
    scored = {w: s - outside.get(w, 0.0) for w, s in inside.items() if s >= 0.15}
    return [w for w, s in sorted(scored.items(), key=lambda x: (-x[1], x[0])) if s > 0.1][:k]


def arithmetic_errors(records: list[dict]) -> dict:
    """Of the prompts ending in a sum "a plus b", how often model_2's number is wrong and model_1's
    right (checks what it can: ``plus``/``minus``/``times`` of two integers)."""
    checked = wrong = 0
    for r in records:
        matches = list(SUM.finditer(last_sentence(str(r.get("prompt", "")))))
        match = matches[-1] if matches else None
        span_1, span_2 = first_disagreement(r.get("generation_1"), r.get("generation_2"))
        if match is None or not span_1.isdigit() or not span_2.isdigit():
            continue
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        truth = a + b if op in ("plus", "+") else a - b if op in ("minus", "-") else a * b
        checked += 1
        wrong += int(span_1) == truth and int(span_2) != truth
    return {"checked": checked, "model_2_wrong": wrong}


def find_behaviours(records: list[dict], clusters: dict, evaluated: dict[str, dict]) -> list[dict]:
    """One description per behaviour cluster (noise included), found ones first.

    Args:
        records: the analysed records.
        clusters: :meth:`BehavioralClusteringAnalyzer.analyze_divergent_behaviors`'s result.
        evaluated: the evaluated record of each prompt, by prompt text (may be empty).
    """
    labels = np.asarray(clusters.get("assignments") or [], dtype=int)
    if len(labels) != len(records):
        return []
    out = []
    for cluster in clusters.get("clusters", []):
        inside = labels == cluster["cluster"]
        members = [r for r, keep in zip(records, inside, strict=True) if keep]
        others = [r for r, keep in zip(records, inside, strict=True) if not keep]
        if members:
            out.append(describe_behaviour(members, others, evaluated, cluster["cluster"]))
    return sorted(out, key=lambda b: (not b["found"], -b["size"]))


def merged_findings(
    records: list[dict], clusters: dict, behaviours: list[dict], evaluated: dict[str, dict]
) -> list[dict]:
    """The found ``behaviours``, clusters that do the same thing (same kind and model_2 phrase)
    merged into one description over their records; confirmed ones first, then the largest."""
    labels = np.asarray(clusters.get("assignments") or [], dtype=int)
    groups: dict[tuple, list[int]] = {}
    for b in behaviours:
        if b["found"]:
            groups.setdefault((b["kind"], b["phrase"]), []).append(b["cluster"])
    out = []
    for ids in groups.values():
        inside = np.isin(labels, ids)
        members = [r for r, keep in zip(records, inside, strict=True) if keep]
        others = [r for r, keep in zip(records, inside, strict=True) if not keep]
        merged = describe_behaviour(members, others, evaluated, min(ids))
        merged["clusters"] = ", ".join(str(i) for i in sorted(ids))
        merged["summary_kind"] = BEHAVIOUR_NAMES.get(merged["kind"], f"“{merged['phrase']}”")
        out.append(merged)
    # Confirmed by the evaluation first, then the larger.
    return sorted(out, key=lambda b: (b["confirmed"] is False, -b["size"]))
