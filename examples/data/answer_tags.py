"""Writes answer-tags-train.jsonl / answer-tags-test.jsonl: sums to answer inside <answer></answer> tags,
for GRPO with the answer_format and answer_match rewards. The test prompts use other numbers (21-40
instead of 1-20) and another question form than the training prompts. Deterministic; run from the
repository root:

    python examples/data/answer_tags.py
"""

import json
import random
from pathlib import Path

TAIL = " Put the number in <answer></answer> tags, like <answer>7</answer>."
TRAIN_FORMS = ["What is {a} plus {b}?", "Add {a} and {b}."]
TEST_FORMS = ["What do you get when you add {a} to {b}?"]


def rows(n, low, high, forms, seed):
    rng = random.Random(seed)
    for i in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        yield {"prompt": forms[i % len(forms)].format(a=a, b=b) + TAIL, "answer": str(a + b)}


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, data in (("answer-tags-train.jsonl", rows(64, 1, 20, TRAIN_FORMS, 0)),
                       ("answer-tags-test.jsonl", rows(16, 21, 40, TEST_FORMS, 1))):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in data))
