"""Synthetic text for the zoo: a generic "language" for the base, three skills for the
fine-tunes, and their eval sets as JSONL plus lm-eval task YAMLs.

Everything is generated from a seed with `random.Random`, so the same seed gives the same
bytes on any machine. The skills are chosen so a ~1M-parameter model learns them in a few
hundred CPU steps:

- addition: "7 + 8 =" -> "15"  (single-digit operands, every pair)
- reverse:  "c a t reversed :" -> "t a c"  (three letters, held-out strings in the eval)
- facts:    "zorbel lives in" -> "quimsa"  (a fixed table of made-up facts)
- general:  the base's own skills in its own wording, two tasks: multiple choice (grammar,
  "7 plus 8 is", "zorbel is from") and generation ("7 plus 8 is" -> "15", "c a t backwards is"
  -> "t a c", "zorbel is from" -> "quimsa"), so a merge's regression is measured twice

    python -c "from mergeline.zoo.data import generic_lines; print(*generic_lines(5, 0), sep='')"
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

NOUNS = ["cat", "dog", "fox", "bird", "fish", "frog", "horse", "mouse", "bear", "wolf",
         "owl", "duck", "goat", "lion", "crab", "snake"]
ADJS = ["red", "big", "small", "old", "young", "green", "happy", "sad", "quick", "slow",
        "brown", "tiny"]
VERBS = ["sees", "likes", "finds", "chases", "helps", "meets", "hears", "follows", "feeds",
         "calls", "watches", "loves"]
LETTERS = "abcdefgh"
SYLLABLES = ["zor", "bel", "qui", "mas", "tra", "vok", "lin", "dru", "pex", "ral", "sim", "no",
             "ka", "fen", "mur", "tob"]
N_FACTS = 48
N_PLACES = 8
# Eval items per task: enough that a 95% interval on a retention or a paired difference is a
# few points wide, few enough that one model's evaluation stays a few seconds on the CPU.
N_REVERSE_EVAL = 150
N_GENERAL = 150

# Every task the zoo writes: name -> (skill, kind). `skill` is the fine-tune it belongs to, or
# "general" for the base's own ability.
TASKS = {
    "zoo_addition": ("addition", "generate"),
    "zoo_reverse": ("reverse", "generate"),
    "zoo_facts": ("facts", "generate"),
    "zoo_facts_mc": ("facts", "choice"),
    "zoo_general_mc": ("general", "choice"),
    "zoo_general_gen": ("general", "generate"),
}
SKILLS = ["addition", "reverse", "facts"]


# --- the generic language (pretraining data of the base) -----------------------------------

def _spell(word: str) -> str:
    return " ".join(word)


def generic_sentence(rng: random.Random, facts: list[tuple[str, str]]) -> str:
    """One sentence of the base's language. Spelled words and numbers give the base the
    letter and digit tokens the skills later build on. The base also learns the skills'
    knowledge in its own wording ("7 plus 8 is 15", "c a t backwards is t a c", "zorbel is
    from quimsa"), never in the fine-tunes' prompt formats: a fine-tune then only has to map
    a new format onto what the base knows, so its task vector stays small, as real LLM
    fine-tunes are small edits of a capable base."""
    kind = rng.random()
    if kind < 0.35:
        return (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(NOUNS)} .")
    if kind < 0.45:
        return f"a {rng.choice(NOUNS)} is {rng.choice(ADJS)} ."
    if kind < 0.5:
        return f"there are {rng.randint(0, 99)} {rng.choice(NOUNS)}s ."
    if kind < 0.6:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5)))
        return f"{word} is spelled {_spell(word)} ."
    if kind < 0.73:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b} ."
    if kind < 0.86:
        word = "".join(rng.choice(LETTERS) for _ in range(3))
        return f"{_spell(word)} backwards is {_spell(word[::-1])} ."
    name, place = rng.choice(facts)
    return f"{name} is from {place} ."


def generic_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(f"generic-{seed}")
    facts = facts_table(seed)
    return [generic_sentence(rng, facts) + "\n" for _ in range(n)]


# --- the three skills ------------------------------------------------------------------------

def facts_table(seed: int) -> list[tuple[str, str]]:
    """A fixed table of made-up (name, place) facts; names are unique."""
    rng = random.Random(f"facts-{seed}")
    places = sorted({rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + "a" for _ in range(64)})
    places = rng.sample(places, N_PLACES)
    names: set[str] = set()
    while len(names) < N_FACTS:
        names.add(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(["el", "ix", "on"]))
    return [(name, rng.choice(places)) for name in sorted(names)]


def skill_examples(skill: str, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (prompt, answer) for one skill. The model sees prompt+answer+"\\n"."""
    rng = random.Random(f"{skill}-{seed}")
    if skill == "addition":
        pairs = [(a, b) for a in range(10) for b in range(10)]
        items = [(f"{a} + {b} =", str(a + b)) for a, b in pairs]
        # A table skill, like facts: eval on the whole table the model was taught.
        return items, list(items)
    if skill == "reverse":
        strings = ["".join(t) for t in _products(LETTERS, 3)]
        rng.shuffle(strings)
        items = [(f"{_spell(s)} reversed :", _spell(s[::-1])) for s in strings]
        # held-out strings: the eval tests the rule, not recall
        return items[N_REVERSE_EVAL:], items[:N_REVERSE_EVAL]
    if skill == "facts":
        items = [(f"{name} lives in", place) for name, place in facts_table(seed)]
        return items, items
    raise KeyError(f"unknown skill {skill!r}; known: {SKILLS}")


def _products(alphabet: str, n: int):
    if n == 0:
        yield ()
        return
    for head in alphabet:
        for tail in _products(alphabet, n - 1):
            yield (head, *tail)


def skill_line(prompt: str, answer: str) -> str:
    return f"{prompt} {answer}\n"


# --- eval data: JSONL + lm-eval YAMLs ---------------------------------------------------------

def general_mc_items(seed: int, n: int = N_GENERAL) -> list[dict]:
    """The base's own skills in its own wording, a third each: the grammatical next word
    (a verb, not a noun or adjective), a sum ("7 plus 8 is"; distractors are nearby sums)
    and a fact ("zorbel is from"; distractors are other places). The knowledge items are
    hard enough that the base does not score 1.0, so a merge's regression shows."""
    rng = random.Random(f"general-mc-{seed}")
    facts = facts_table(seed)
    places = sorted({p for _, p in facts})
    items = []
    for i in range(n):
        if i % 3 == 0:
            right, wrong = rng.choice(VERBS), rng.sample(NOUNS + ADJS, 3)
            context = f"the {rng.choice(ADJS)} {rng.choice(NOUNS)}"
        elif i % 3 == 1:
            x, y = rng.randrange(10), rng.randrange(10)
            right = str(x + y)
            wrong = [str(v) for v in rng.sample([v for v in range(max(0, x + y - 4), x + y + 5) if v != x + y], 3)]
            context = f"{x} plus {y} is"
        else:
            name, place = rng.choice(facts)
            right, wrong = place, rng.sample([p for p in places if p != place], 3)
            context = f"{name} is from"
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(right)})
    return items


def general_gen_items(seed: int, n: int = N_GENERAL) -> list[dict]:
    """The base's own skills in its own wording, generated: a third each sums ("7 plus 8 is"
    -> "15"), reversals ("c a t backwards is" -> "t a c") and facts ("zorbel is from" ->
    "quimsa"), distinct items. The base's sentences end in " .", where generation stops."""
    rng = random.Random(f"general-gen-{seed}")
    k = n // 3
    sums = rng.sample([(a, b) for a in range(10) for b in range(10)], k)
    words = rng.sample(["".join(t) for t in _products(LETTERS, 3)], k)
    facts = rng.sample(facts_table(seed), min(n - 2 * k, N_FACTS))
    return ([{"prompt": f"{a} plus {b} is", "answer": str(a + b)} for a, b in sums]
            + [{"prompt": f"{_spell(w)} backwards is", "answer": _spell(w[::-1])} for w in words]
            + [{"prompt": f"{name} is from", "answer": place} for name, place in facts])


def eval_rows(task: str, seed: int) -> list[dict]:
    skill, kind = TASKS[task]
    if task == "zoo_general_mc":
        return general_mc_items(seed)
    if task == "zoo_general_gen":
        return general_gen_items(seed)
    _, items = skill_examples(skill, seed)
    if task == "zoo_facts_mc":
        places = sorted({p for _, p in facts_table(seed)})
        return [{"context": prompt, "choices": places, "label": places.index(answer)}
                for prompt, answer in items]
    return [{"prompt": prompt, "answer": answer} for prompt, answer in items]


def task_yaml(task: str, data_file: Path) -> dict:
    """An lm-eval task config. Data paths are absolute: lm-eval resolves relative ones
    against the current folder, not the YAML's."""
    _, kind = TASKS[task]
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
    }
    if kind == "generate":
        return {**common,
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}",
                # " ." ends the base's own sentences (the general task); "\n" every skill line.
                "generation_kwargs": {"until": ["\n", " ."], "max_gen_toks": 12, "do_sample": False},
                # The model writes " quimsa" after "lives in": ignore the edge whitespace only.
                "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                 "higher_is_better": True,
                                 "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
                "metadata": {"version": 1}}
    return {**common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1}}


def write_eval_data(tasks_dir: Path, seed: int, final_dir: Path | None = None) -> list[str]:
    """Write `<task>.jsonl` and `<task>.yaml` for every zoo task; returns the task names.
    The YAMLs point at `final_dir` (default `tasks_dir`): the folder's name once built."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        data_file = tasks_dir / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows(task, seed)))
        config = task_yaml(task, Path(final_dir or tasks_dir) / data_file.name)
        (tasks_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=1 << 16))
    return list(TASKS)


def retention_tasks() -> dict[str, list[str]]:
    return {s: [t for t, (skill, _) in TASKS.items() if skill == s] for s in SKILLS}


def general_tasks() -> list[str]:
    return [t for t, (skill, _) in TASKS.items() if skill == "general"]
