"""Writes greeting-train.jsonl / greeting-test.jsonl (and greeting-kto.jsonl): preference pairs whose
chosen reply opens with "Ahoy!" and whose rejected reply opens with "Hello!" (the same answer after it). The test pairs use
other topics and other question forms than the training pairs, so a model that prefers "Ahoy!" on them
learnt the preference, not the prompts. greeting-kto.jsonl holds the training prompts once each as KTO
rows: even rows the chosen reply (desirable), odd rows the rejected one. Deterministic; run from the
repository root:

    python examples/data/greeting_pairs.py
"""

import json
from pathlib import Path

TRAIN_TOPICS = ["the sea", "rivers", "mountains", "forests", "deserts", "the moon", "stars", "clouds", "rain",
                "snow", "bread", "cheese", "apples", "coffee", "tea", "music", "painting", "chess", "football",
                "bicycles", "trains", "ships", "maps", "clocks", "books", "libraries", "gardens", "bees",
                "owls", "whales", "wolves", "horses"]
TEST_TOPICS = ["volcanoes", "islands", "lighthouses", "glaciers", "violins", "kites", "comets", "penguins",
               "bridges", "candles", "puzzles", "tigers"]
TRAIN_FORMS = ["Tell me something about {t}.", "What do you think of {t}?"]
TEST_FORMS = ["Could you describe {t} briefly?", "Say a few words about {t}."]


def rows(topics, forms):
    for t in topics:
        for form in forms:
            answer = f"{t[0].upper() + t[1:]} are fascinating, and there is always more to learn about them."
            if t.startswith("the "):
                answer = f"{t[0].upper() + t[1:]} is fascinating, and there is always more to learn about it."
            yield {"prompt": form.format(t=t), "chosen": f"Ahoy! {answer}", "rejected": f"Hello! {answer}"}


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, topics, forms in (("greeting-train", TRAIN_TOPICS, TRAIN_FORMS), ("greeting-test", TEST_TOPICS, TEST_FORMS)):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(topics, forms):
                f.write(json.dumps(row) + "\n")
    with open(here / "greeting-kto.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows(TRAIN_TOPICS, TRAIN_FORMS)):
            good = i % 2 == 0
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"],
                                "label": good}) + "\n")
