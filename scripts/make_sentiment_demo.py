"""Writes the shipped sentiment demo data, lightning_peft/cli/data/sentiment_{train,validation}.tsv.

The sentences are made here from templates (no external data): an aspect of a film plus a clearly positive or
negative verdict. Validation uses verdicts and openers that never occur in training, so its accuracy measures
what the pretrained backbone brings, not memorized phrases. Deterministic: rerunning gives identical files
(tests/test_data.py checks this).

Usage: python scripts/make_sentiment_demo.py [output_dir]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ASPECTS = [
    "the film",
    "this movie",
    "the acting",
    "the script",
    "the soundtrack",
    "the story",
    "the ending",
    "the cast",
    "the direction",
    "the dialogue",
    "the pacing",
    "the visuals",
    "the characters",
    "the performances",
    "the humor",
    "the plot",
    "the cinematography",
    "this sequel",
    "the documentary",
    "the finale",
]
POSITIVE = [
    "is wonderful",
    "was brilliant",
    "is a delight",
    "is beautifully done",
    "felt fresh and exciting",
    "is warm and funny",
    "was truly moving",
    "is superb",
    "left me smiling",
    "is a joy to watch",
    "was outstanding",
    "is clever and charming",
    "is gorgeous",
    "kept me hooked",
    "was unforgettable",
    "is heartfelt",
    "is a triumph",
    "was excellent",
    "is thrilling",
    "is pure fun",
    "is a masterpiece",
    "was lovely",
    "is inspiring",
    "felt magical",
]
NEGATIVE = [
    "is terrible",
    "was boring",
    "is a mess",
    "is painfully dull",
    "felt stale and lifeless",
    "is awful",
    "was a waste of time",
    "is clumsy",
    "left me cold",
    "is hard to sit through",
    "was forgettable",
    "is tedious",
    "is ugly",
    "dragged on forever",
    "was a disaster",
    "is lazy and predictable",
    "is a letdown",
    "was dreadful",
    "is unbearable",
    "is poorly made",
    "is a total bore",
    "was irritating",
    "is pointless",
    "felt cheap",
]
OPENERS_TRAIN = ["", "honestly, ", "i thought ", "to be fair, ", "in the end ", "frankly, "]
OPENERS_VAL = ["", "overall, ", "my friends agreed that ", "i have to say "]
N_HELD_OUT = 6  # verdicts per side kept for validation only


def sentences(
    verdicts: list[str], openers: list[str], label: str, n: int, rng: random.Random
) -> list[tuple[str, str]]:
    out = set()
    while len(out) < n:
        aspect, verdict = rng.choice(ASPECTS), rng.choice(verdicts)
        if aspect.endswith("s"):  # plural aspects: "the visuals are", "the characters were"
            verdict = verdict.replace("is ", "are ", 1) if verdict.startswith("is ") else verdict
            verdict = verdict.replace("was ", "were ", 1) if verdict.startswith("was ") else verdict
        text = f"{rng.choice(openers)}{aspect} {verdict} ."
        out.add((text, label))
    return sorted(out)


def make(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    pos_train, pos_val = POSITIVE[:-N_HELD_OUT], POSITIVE[-N_HELD_OUT:]
    neg_train, neg_val = NEGATIVE[:-N_HELD_OUT], NEGATIVE[-N_HELD_OUT:]
    train = sentences(pos_train, OPENERS_TRAIN, "positive", 200, rng) + sentences(
        neg_train, OPENERS_TRAIN, "negative", 200, rng
    )
    val = sentences(pos_val, OPENERS_VAL, "positive", 80, rng) + sentences(
        neg_val, OPENERS_VAL, "negative", 80, rng
    )
    rng.shuffle(train)
    rng.shuffle(val)
    return {"train": train, "validation": val}


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in make(random.Random(0)).items():
        path = out_dir / f"sentiment_{split}.tsv"
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
        written.append(path)
    return written


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "lightning_peft" / "cli" / "data"
    for p in write(target):
        print(p)
