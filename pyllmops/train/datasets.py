"""Examples: JSONL files or Python lists, validated; and the small synthetic sets shipped in the package.

SFT examples are {"prompt": str, "completion": str}; preference examples are {"prompt": str,
"chosen": str, "rejected": str}. The shipped sets (pyllmops/train/data/*.jsonl) are written by
`python -m pyllmops.train.datasets` from a fixed seed: five string tasks a byte-level model can learn in
seconds (upper-case, reverse, add two digits, repeat, first letter); the rejected answer of a
preference pair is a plausible mistake (the word unchanged, an off-by-one sum, ...).
"""
import json
import os
import random
from importlib import resources

SFT_KEYS = ("prompt", "completion")
DPO_KEYS = ("prompt", "chosen", "rejected")
_DATA = "data"


def load_examples(source, keys):
    """A JSONL path or a list of dicts -> list of dicts with string values for `keys` (checked)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"examples path {path!r} is not a file (expected a JSONL file or a list of dicts)")
        with open(path, encoding="utf-8") as f:
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from None
    elif isinstance(source, (list, tuple)):
        rows = list(source)
    else:
        raise TypeError(f"examples must be a JSONL path or a list of dicts, got {type(source).__name__}")
    if not rows:
        raise ValueError("examples are empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"examples[{i}] must be a dict with keys {list(keys)}, got {type(row).__name__}")
        for k in keys:
            if not isinstance(row.get(k), str):
                raise ValueError(f"examples[{i}] needs a string {k!r} (keys {list(keys)}), got {row.get(k)!r}")
        if any(not row[k] for k in keys[1:]):
            raise ValueError(f"examples[{i}] has an empty {[k for k in keys[1:] if not row[k]]} field")
    return [{k: row[k] for k in keys} for row in rows]


def _shipped(name):
    return resources.files("pyllmops.train").joinpath(_DATA, name)


def instruction_data():
    """The shipped synthetic instruction set: list of {"prompt", "completion"}."""
    with resources.as_file(_shipped("instructions.jsonl")) as p:
        return load_examples(p, SFT_KEYS)


def preference_data():
    """The shipped synthetic preference set: list of {"prompt", "chosen", "rejected"}."""
    with resources.as_file(_shipped("preferences.jsonl")) as p:
        return load_examples(p, DPO_KEYS)


_SYLLABLES = ["ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo", "xe", "ha"]


def _task(rng):
    """(prompt, correct answer, plausible wrong answer) for one random task."""
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
    kind = rng.choice(["upper", "reverse", "add", "repeat", "first"])
    if kind == "upper":
        return f"upper: {word}\n", word.upper(), word
    if kind == "reverse":
        return f"reverse: {word}\n", word[::-1], word
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add: {a}+{b}\n", str(a + b), str(a + b + rng.choice([-1, 1]))
    if kind == "repeat":
        return f"repeat: {word}\n", f"{word} {word}", word
    return f"first: {word}\n", word[0], word[-1] if word[-1] != word[0] else word[1:]


def synthetic(n, seed, preferences):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, good, bad = _task(rng)
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad} if preferences
                    else {"prompt": prompt, "completion": good})
    return rows


def _write_shipped():
    out = os.path.join(os.path.dirname(__file__), _DATA)
    os.makedirs(out, exist_ok=True)
    for name, rows in (("instructions.jsonl", synthetic(1500, 1234, False)),
                       ("preferences.jsonl", synthetic(400, 5678, True))):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    _write_shipped()
