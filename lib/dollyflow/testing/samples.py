"""Generated instruction records in the databricks-dolly-15k schema.

For a fresh clone without ``../shared`` (tests, the local demo): deterministic, varied English
records over the eight Dolly categories, some with context. They exercise every code path; they
are not training data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = ["open_qa", "closed_qa", "information_extraction", "summarization",
              "brainstorming", "classification", "creative_writing", "general_qa"]
_SUBJECTS = ["the river", "a lighthouse", "the old library", "a migrating bird", "the city council",
             "a violin maker", "the harvest", "a mountain village", "the research team", "a comet",
             "the bakery", "a chess club", "the museum", "a solar panel", "the orchestra", "a glacier"]
_VERBS = ["describes", "explains", "remembers", "questions", "celebrates", "measures", "protects",
          "changes", "follows", "builds", "studies", "visits"]
_OBJECTS = ["the first snowfall", "an unusual map", "the morning tide", "a forgotten recipe",
            "the village square", "a quiet experiment", "the northern lights", "a broken clock",
            "the summer festival", "a new bridge", "the election results", "a family tradition"]
_ASKS = ["What", "Why", "How", "When", "Where", "Who"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}" \
           f" near {rng.choice(_SUBJECTS)} in {rng.randint(1800, 2025)}."


def generate_records(n: int, seed: int = 42) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        has_context = category in ("closed_qa", "information_extraction", "summarization")
        context = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5))) if has_context else ""
        instruction = f"{rng.choice(_ASKS)} {rng.choice(_VERBS)} {rng.choice(_SUBJECTS)} " \
                      f"about {rng.choice(_OBJECTS)} (case {i})?"
        response = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
        out.append({"instruction": instruction, "context": context, "response": response,
                    "category": category})
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
