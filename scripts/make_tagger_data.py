"""Write train/assets/tagger.jsonl: the small quote -> tags dataset the default run trains on.

Same shape as the seeds' dataset (Abirate/english_quotes): one JSON object per line with
"quote" (str), "author" (str) and "tags" (list of str), so `--text-template "{quote} ->: {tags}"`
renders `The heart keeps the clock. ->: ['love', 'time']` exactly as the seeds' recipe does; and
"label" (str), the first tag, for sequence classification (`python -m train --task seq-cls`).

The rule a model can learn: each quote contains one or two keywords, each keyword belongs to one
topic, and the tags are the topics of the keywords present, in the fixed TOPICS order. Everything
else in a quote (the sentence frame, the author) carries no information about the tags.

Deterministic: `python scripts/make_tagger_data.py` rewrites the same file byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# topic (the tag) -> keywords that imply it. No keyword is a substring of another word used here.
TOPICS = {
    "love": ["heart", "kiss", "darling"],
    "time": ["clock", "hour", "yesterday"],
    "nature": ["river", "forest", "mountain"],
    "hope": ["dream", "dawn", "wish"],
    "work": ["labor", "craft", "effort"],
    "wisdom": ["truth", "lesson", "mind"],
}

# Frames with one or two keyword slots; the frame words are never keywords.
ONE = [
    "The {a} never lies to those who listen.",
    "Keep your {a} close and your doubts far.",
    "Nobody walks away from the {a} unchanged.",
    "All we have is the {a} we carry.",
    "A quiet {a} says more than a loud crowd.",
    "Give the {a} a chance to speak.",
]
TWO = [
    "Every {a} remembers the {b}.",
    "Follow the {a} and you will find the {b}.",
    "A {a} is worth more than a {b}.",
    "Between the {a} and the {b} lies a choice.",
    "The {a} was there before the {b}.",
    "Trade a {a} for a {b} and you lose both.",
]
AUTHORS = ["Ada Lane", "Bo Ruiz", "Cy Moss", "Di Park", "Ed Vance", "Flo Kim", "Gus Hale"]


def make_rows(n: int, seed: int) -> list[dict]:
    """n rows, each {"quote", "author", "tags", "label"}; tags follow TOPICS order, label = tags[0]."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    rows = []
    for _ in range(n):
        k = rng.choice([1, 2])
        chosen = rng.sample(topics, k)  # distinct topics, random order inside the quote
        words = [rng.choice(TOPICS[t]) for t in chosen]
        frame = rng.choice(ONE if k == 1 else TWO)
        quote = frame.format(a=words[0], b=words[-1])
        quote = quote[0].upper() + quote[1:]
        tags = [t for t in topics if t in chosen]
        # label: one class per quote for `--task seq-cls` (the first tag), drawn from no random number,
        # so the other columns and every run on them stay as they were
        rows.append({"quote": quote, "author": rng.choice(AUTHORS), "tags": tags, "label": tags[0]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1200, help="number of rows (default 1200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parents[1] / "train" / "assets" / "tagger.jsonl")
    args = p.parse_args()
    rows = make_rows(args.n, args.seed)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out)  # atomic: a reader never sees half a file
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
