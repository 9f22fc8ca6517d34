"""Retrieval tasks generated from a seed: what `kvchat eval` asks and what method tuning sweeps on.

    from kvchat.quality import make_case, make_cases, score, seeds
    case = make_case("passkey", 2048, seed=7, tokenizer=tok)   # a Case: prompt_ids, answer, distractors
    cases = make_cases("multikey", 2048, tok, seeds("tuning", 24))
    score(case, "The code is 48213.")                          # -> True / False

Tasks (the question always comes after the context, inside what the cache compresses):
    passkey   one number hidden at a depth of the filler
    multikey  four labelled numbers; one label is asked for, the other three are distractors
    reassign  one label assigned, then reassigned further on; the last value must be returned

A seed fixes everything: the filler kind (`seed + task index` mod 4, so any four consecutive seeds cover
the four fillers), the phrasing of the facts and the question (`seed // 4` mod 3), the depths and the
numbers. Seeds 0-999 are the TUNING range (tests, method sweeps); 1000 and up are HELD-OUT (what
`kvchat eval` reports by default): a method tuned on the first range is judged on the second.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvchat.quality.sources import FILLERS, JOINERS, units

TASKS = ("passkey", "multikey", "reassign")
# multikey is beyond SmolLM2-135M even with the full cache (3 of 12 at 2k tokens; 6 of 12 with two keys),
# so `kvchat eval` leaves it out unless asked (--tasks): it would measure the model, not the cache.
DEFAULT_TASKS = ("passkey", "reassign")
TUNING = range(0, 1000)
HELD_OUT_START = 1000
SPLITS = ("heldout", "tuning")

# (fact, question) per phrasing; {v} is the value.
PASSKEY = (
    # Not "pass key": the prose filler is Python's documentation, where "pass" is a statement the 135M
    # model then explains instead of answering.
    ("The magic number is {v}. Remember it. {v} is the magic number.",
     "What is the magic number? Answer with the number only."),
    ("Keep this secret number in mind: {v}.", "What was the secret number? Reply with just the number."),
    ("Note: the access code for the vault is {v}.", "Which access code opens the vault?"),
)
# (fact, question, labels); one label is asked for.
MULTIKEY = (
    ("The code for the {k} door is {v}.", "What is the code for the {k} door? Answer with the number only.",
     ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")),
    ("{k}'s phone extension is {v}.", "What is {k}'s phone extension? Reply with just the number.",
     ("Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farah", "Gustav", "Hiro")),
    ("The pass key for {k} is {v}.", "Tell me the pass key for {k}.",
     ("Oslo", "Lima", "Cairo", "Quito", "Hanoi", "Dakar", "Perth", "Riga")),
)
# (first assignment, later assignments, question, labels). "Update: ... has changed" makes the last one
# stand out for the 135M model (full: 9 of 12 at 2k tokens without it, 11 of 12 with it).
REASSIGN = (
    ("The value of {k} is {v}.", "Update: the value of {k} has changed. The value of {k} is now {v}.",
     "What is the value of {k} now? Answer with the number only.", ("X", "Y", "Z", "Q")),
    ("The {k} counter reads {v}.", "Update: the {k} counter has changed and now reads {v}.",
     "What does the {k} counter read now? Reply with just the number.", ("north", "south", "east", "west")),
    ("The combination of the {k} safe is {v}.",
     "Update: the combination of the {k} safe has changed. The combination of the {k} safe is now {v}.",
     "What is the combination of the {k} safe now? Give only the number.", ("office", "hotel", "bank", "garage")),
)
PHRASINGS = {"passkey": len(PASSKEY), "multikey": len(MULTIKEY), "reassign": len(REASSIGN)}
N_KEYS = 4
N_ASSIGN = 2  # with three, full found 5 of 12 at 2k tokens (the 135M model returns an earlier value)



@dataclass(frozen=True)
class Case:
    """One generated prompt and what answers it. `prompt_ids` is chat-templated, at most `n_tokens` long."""

    task: str
    seed: int
    n_tokens: int
    filler: str
    phrasing: int
    depths: tuple[float, ...]  # where the facts sit, as shares of the filler (in the order they appear)
    content: str  # the user message
    prompt_ids: list[int]
    answer: str
    distractors: tuple[str, ...]


def seeds(split: str, n: int, offset: int = 0) -> list[int]:
    """`n` seeds of a split: "tuning" (0-999) or "heldout" (1000 and up)."""
    if split == "tuning":
        if offset + n > len(TUNING):
            raise ValueError(f"the tuning range has {len(TUNING)} seeds; asked for {offset} + {n}")
        return list(range(offset, offset + n))
    if split == "heldout":
        return list(range(HELD_OUT_START + offset, HELD_OUT_START + offset + n))
    raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


def chat_ids(tokenizer, content: str) -> list[int]:
    """The one place the tasks apply a chat template (a base model gets the plain text)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer(content, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _values(rng: random.Random, n: int, avoid: str) -> list[str]:
    """`n` distinct 5-digit numbers, none of which occurs as a number in `avoid` (the filler)."""
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10000, 99999))
        if v not in out and not re.search(rf"(?<!\d){v}(?!\d)", avoid):
            out.append(v)
    return out


def _facts(task: str, phrasing: int, seed: int, rng: random.Random, filler_text: str):
    """-> (facts in context order, their depths, question, answer, distractors)."""
    if task == "passkey":
        fact, question = PASSKEY[phrasing]
        (v,) = _values(rng, 1, filler_text)
        depth = 0.05 + 0.9 * ((seed * 0.6180339887) % 1.0)  # low-discrepancy: consecutive seeds spread out
        return [fact.format(v=v)], [depth], question, v, ()
    if task == "multikey":
        fact, question, labels = MULTIKEY[phrasing]
        keys = rng.sample(labels, N_KEYS)
        vals = _values(rng, N_KEYS, filler_text)
        depths = sorted(rng.uniform(0.05, 0.95) for _ in keys)
        target = rng.randrange(N_KEYS)
        return ([fact.format(k=k, v=v) for k, v in zip(keys, vals)], depths, question.format(k=keys[target]),
                vals[target], tuple(v for i, v in enumerate(vals) if i != target))
    if task == "reassign":
        first, later, question, labels = REASSIGN[phrasing]
        k = rng.choice(labels)
        vals = _values(rng, N_ASSIGN, filler_text)
        depths = sorted(rng.uniform(0.05, 0.95) for _ in vals)
        facts = [first.format(k=k, v=vals[0])] + [later.format(k=k, v=v) for v in vals[1:]]
        return facts, depths, question.format(k=k), vals[-1], tuple(vals[:-1])
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def _head(unit: list[str], budget: int, tokenizer) -> list[str]:
    """The sentences of a unit that fit `budget` tokens: a long paragraph must not leave a gap."""
    if not unit or budget < 16:
        return []
    out = []
    for sentence in re.split(r"(?<=\. )", unit[0]):
        if len(tokenizer(" ".join(out + [sentence]), add_special_tokens=False)["input_ids"]) > budget - 4:
            break
        out.append(sentence)
    return ["".join(out).strip()] if out else []


def _assemble(kind: str, filler: list[str], facts: list[str], depths: list[float], question: str) -> str:
    body = list(filler)
    # Insert from the last fact back so earlier indices stay valid (facts at one depth keep their order).
    for i in sorted(range(len(facts)), key=lambda i: (-depths[i], -i)):
        body.insert(round(depths[i] * len(filler)), facts[i])
    return JOINERS[kind].join(body) + "\n\n" + question


def make_case(task: str, n_tokens: int, seed: int, tokenizer) -> Case:
    """The case of `task` for `seed`, its chat-templated prompt as close to `n_tokens` as the filler's
    units allow without going over."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    kind = FILLERS[(seed + TASKS.index(task)) % len(FILLERS)]
    phrasing = (seed // len(FILLERS)) % PHRASINGS[task]
    pool = units(kind, rng, n_chars=n_tokens * 6)
    facts, depths, question, answer, distractors = _facts(task, phrasing, seed, rng, "\n".join(pool))
    base = len(chat_ids(tokenizer, _assemble(kind, [], facts, depths, question)))
    if base >= n_tokens:
        raise ValueError(f"{task} needs more than {n_tokens} tokens ({base} without filler); use a longer length")
    joiner = JOINERS[kind]
    costs = [len(ids) for ids in tokenizer([joiner + u for u in pool], add_special_tokens=False)["input_ids"]]
    take, used = 0, base
    while take < len(pool) and used + costs[take] <= n_tokens:
        used += costs[take]
        take += 1
    filler = pool[:take] + _head(pool[take:take + 1], n_tokens - used, tokenizer)
    while True:  # units tokenized alone miscount at the joins by a token or two: trim until it fits
        content = _assemble(kind, filler, facts, depths, question)
        ids = chat_ids(tokenizer, content)
        if len(ids) <= n_tokens or not filler:
            break
        filler = filler[:-1]
    return Case(task, seed, n_tokens, kind, phrasing, tuple(round(d, 4) for d in depths), content, ids, answer,
                distractors)


def make_cases(task: str, n_tokens: int, tokenizer, seed_list) -> list[Case]:
    return [make_case(task, n_tokens, s, tokenizer) for s in seed_list]
