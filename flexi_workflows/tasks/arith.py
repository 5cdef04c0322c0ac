"""A built-in math task with graded difficulty: arithmetic word problems generated offline.

    "Ben has 4 cards. He finds 5 more. He sells 2. How many cards?"   →   "4+5=9. 9-2=7. #### 7"

Levels (shared/notes/quickstart-feasibility.md): L1 one operation from a start of 1-9; L2 one
operation from 10-19; L3 two operations from 1-20; L4 three operations from 1-20; operands 1-9 and
the running total kept in 0-39. Rows carry `group` easy (L1, L2) or hard (L3, L4) so evaluation can
report both. The answers show their working steps: that is what lets a tiny model learn them.

Splits (DataSource name "arith"): `pretrain` (mix L1-L4 = .5/.4/.1/0, for building the quickstart's
base model), `train` (.1/.2/.35/.35, the fine-tuning set), `test` (.25 each, held out: no test
question appears in the other splits), `dev` (.25 each, for design decisions: no dev question
appears in test, train or pretrain, so choosing on dev never looks at an evaluation item). `limit`
sets the number of rows (defaults in SPLITS).

What fine-tuning teaches that the base lacks: the base sees one- and two-step problems in
pretraining and never a three-step one (L4), and few two-step ones (L3), so it solves nearly every
easy problem and a quarter of the hard ones. The fine-tuning set is mostly hard problems: carrying a
running total through two and three steps is the skill it adds (docs/benchmark.md has the numbers).
"""

from __future__ import annotations

import random

from flexi_workflows.errors import DataError
from flexi_workflows.tasks.base import DataSource, Row
from flexi_workflows.tasks.math import MathTask

NAMES = ["Ben", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy", "Tom", "Eva"]
ITEMS = ["cards", "apples", "stamps", "coins", "shells", "books", "marbles", "pens"]
ADD = ["finds {n} more", "gets {n} more", "buys {n} more", "wins {n} more"]
SUB = ["sells {n}", "gives away {n}", "loses {n}", "eats {n}"]
GENERATOR_VERSION = 2  # bump when make_problem or generate change what they produce (the built-in base is rebuilt)
LEVELS = {1: ((1, 9), 1), 2: ((10, 19), 1), 3: ((1, 20), 2), 4: ((1, 20), 3)}
SPLITS = {  # name: (level mix, seed, default rows)
    "pretrain": ((0.5, 0.4, 0.1, 0.0), 11, 20000),
    "train": ((0.1, 0.2, 0.35, 0.35), 22, 2000),
    "test": ((0.25, 0.25, 0.25, 0.25), 33, 400),
    "dev": ((0.25, 0.25, 0.25, 0.25), 44, 400),
}


def make_problem(rng: random.Random, level: int) -> tuple[str, str, int]:
    (lo, hi), n_ops = LEVELS[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(lo, hi)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(n_ops):
        n = rng.randint(1, 9)
        can_add, can_sub = total + n <= 39, total - n >= 0
        add = rng.random() < 0.5 if (can_add and can_sub) else can_add
        if add:
            sentences.append("He " + rng.choice(ADD).format(n=n) + ".")
            steps.append(f"{total}+{n}={total + n}.")
            total += n
        else:
            sentences.append("He " + rng.choice(SUB).format(n=n) + ".")
            steps.append(f"{total}-{n}={total - n}.")
            total -= n
    question = " ".join(sentences) + f" How many {item}?"
    return question, " ".join(steps) + f" #### {total}", total


def generate(split: str, n: int | None = None, exclude: set[str] | None = None) -> list[Row]:
    if split not in SPLITS:
        raise DataError(f"arith: unknown split {split!r}; one of {', '.join(SPLITS)}")
    mix, seed, default_n = SPLITS[split]
    n = n or default_n
    rng = random.Random(seed)
    exclude = exclude or set()
    counts = [int(round(share * n)) for share in mix]
    counts[max(range(4), key=lambda i: mix[i])] += n - sum(counts)
    rows: list[Row] = []
    seen: set[str] = set()
    for level, count in zip((1, 2, 3, 4), counts):
        made, tries = 0, 0
        while made < count:
            tries += 1
            if tries > 200 * count + 1000:
                raise DataError(f"arith: cannot make {count} distinct level-{level} problems for split {split}")
            question, target, answer = make_problem(rng, level)
            if question in exclude or (split in ("test", "dev") and question in seen):  # held-out sets: distinct
                continue
            seen.add(question)
            rows.append({"id": f"arith_{split}:{len(rows)}", "question": question, "context": "", "target": target,
                         "answers": [str(answer)], "group": "easy" if level <= 2 else "hard", "level": level,
                         "source": f"arith_{split}"})
            made += 1
    random.Random(seed + 1).shuffle(rows)
    return rows


class ArithTask(MathTask):
    name = "arith"

    def _load(self, source: DataSource) -> list[Row]:
        if source.path:
            return super()._load(source)
        return generate(source.split, source.limit, excluded_questions(source.split))


def excluded_questions(split: str) -> set[str] | None:
    """Questions a split must not contain: the test set's everywhere; the dev set also avoids the
    default training and pretraining sets (it is drawn after them, so they stay as they were)."""
    if split == "test":
        return None
    test = {r["question"] for r in generate("test")}
    if split != "dev":
        return test
    return test | {r["question"] for r in generate("train", None, test)} | {r["question"] for r in generate("pretrain", None, test)}
