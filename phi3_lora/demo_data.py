"""The embedded demo dataset: deterministic multi-turn chat tasks a tiny model can visibly learn.

Each conversation is one of a handful of tasks (adding numbers, reversing and counting words,
upper-casing, greeting), sometimes with a system prompt and sometimes with a follow-up turn.
Answers follow fixed phrasings, so a small random model with LoRA learns them within minutes
on a CPU, and its evaluation loss falls far below the untrained one. The tasks have few variants
besides the additions, so conversations repeat, which is what lets a tiny model learn them; the
evaluation rows are held out among those that occur once (``data.build_datasets``), so it is measured on
conversations the model has not seen. The same seed always gives the same conversations.
"""

from __future__ import annotations

import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "orbit", "maple", "candle",
         "silver", "garden", "rocket", "pepper", "violet", "forest", "island", "marble", "pencil", "window"]
SYSTEM_PROMPTS = ["You are a precise assistant.", "Answer briefly.", "You are a friendly helper."]


def _task(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
        if rng.random() < 0.5:
            turns.append(("And twice that?", f"Twice {a + b} is {2 * (a + b)}."))
    elif kind == 1:
        w = rng.choice(WORDS)
        turns = [(f"Spell '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'.")]
    elif kind == 2:
        w = rng.choice(WORDS)
        turns = [(f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters.")]
        if rng.random() < 0.5:
            turns.append(("Write it in capitals.", f"In capitals: {w.upper()}."))
    elif kind == 3:
        w = rng.choice(WORDS)
        turns = [(f"Write '{w}' in capitals.", f"In capitals: {w.upper()}.")]
    else:
        name = rng.choice(["Ada", "Alan", "Grace", "Linus", "Barbara"])
        turns = [(f"Hello, I am {name}.", f"Hello {name}! How can I help you today?")]
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def demo_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations in the ``messages`` format; about a third start with a system prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = _task(rng)
        if rng.random() < 0.33:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        rows.append({"id": f"demo-{i}", "messages": messages})
    return rows
