"""Generated English sentences for the demo corpus: many, varied, reproducible.

Why: a small TTS LLM learns to read (to align text with speech) from many sentences, not from many
passes over a few: on the 248 hand-written sentences alone the demo LLM memorised its training set
and its held-out accuracy stopped just above "repeat the last token". A seeded template grammar
over a few hundred common words gives as many distinct sentences as asked for, covering English
phonemes in varied contexts, with no data set to download. The hand-written sentences stay the
held-out ones (natural text the grammar never produced).
"""

from __future__ import annotations

import random

NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Maria", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tom", "Victor", "Wendy", "Zoe")
ADJECTIVES = ("old", "young", "small", "large", "bright", "dark", "quiet", "noisy", "happy", "tired", "warm",
              "cold", "green", "yellow", "heavy", "gentle", "clever", "strange", "famous", "empty", "narrow",
              "wooden", "shiny", "rough", "smooth", "little", "busy", "lazy", "careful", "brave", "curious",
              "friendly", "ancient", "modern", "golden", "silver", "purple", "sharp", "soft", "wild")
NOUNS = ("cat", "dog", "boy", "girl", "teacher", "farmer", "doctor", "baker", "sailor", "painter", "horse",
         "bird", "fisherman", "driver", "student", "neighbour", "soldier", "singer", "chef", "pilot", "rabbit",
         "fox", "child", "nurse", "writer", "judge", "clown", "king", "queen", "monkey", "goat", "duck")
THINGS = ("book", "letter", "basket", "box", "lamp", "chair", "coat", "bottle", "map", "ticket", "key", "drum",
          "apple", "cake", "shoe", "bell", "ladder", "kettle", "picture", "rope", "wheel", "hammer", "jar",
          "blanket", "pencil", "umbrella", "candle", "guitar", "feather", "envelope", "mirror", "bucket")
PLACES = ("garden", "kitchen", "station", "market", "harbour", "forest", "valley", "village", "library",
          "museum", "bakery", "river", "bridge", "castle", "school", "hospital", "theatre", "field", "island",
          "church", "office", "factory", "beach", "hotel", "cellar", "attic", "square", "tower")
VERBS_PAST = ("found", "carried", "dropped", "painted", "opened", "closed", "bought", "sold", "lost", "cleaned",
              "fixed", "borrowed", "wrapped", "dragged", "pushed", "pulled", "hid", "kept", "brought", "threw",
              "caught", "broke", "washed", "checked", "moved", "lifted", "filled", "emptied", "watched", "touched")
VERBS_BASE = ("find", "carry", "drop", "paint", "open", "close", "buy", "sell", "clean", "fix", "borrow",
              "wrap", "push", "pull", "hide", "keep", "bring", "throw", "catch", "wash", "check", "move", "lift",
              "fill", "watch", "touch", "measure", "repair", "collect", "deliver")
VERBS_MOTION = ("walked", "ran", "hurried", "wandered", "drove", "rode", "climbed", "jumped", "danced", "swam",
                "crawled", "marched", "strolled", "raced", "travelled", "sailed", "flew", "rushed")
PREPOSITIONS = ("in", "near", "behind", "under", "beside", "across", "through", "around", "inside", "outside",
                "towards", "past", "along", "over")
TIMES = ("this morning", "last night", "on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday",
         "on Saturday", "on Sunday", "at noon", "at midnight", "yesterday", "today", "in the evening",
         "before dinner", "after lunch", "in spring", "in winter", "every summer", "in autumn")
ADVERBS = ("slowly", "quickly", "quietly", "carefully", "happily", "loudly", "gently", "suddenly", "badly",
           "proudly", "nervously", "eagerly", "calmly", "rarely", "easily")
PRONOUNS = ("I", "You", "We", "They", "She", "He")
AUXILIARIES = ("will", "can", "should", "must", "might", "could", "would")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty",
           "forty", "a hundred")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("x", "s", "sh", "ch")) else "s")


def _sentence(r: random.Random) -> str:
    c = r.choice
    kind = r.randrange(8)
    if kind == 0:
        return f"The {c(ADJECTIVES)} {c(NOUNS)} {c(VERBS_PAST)} the {c(THINGS)} {c(PREPOSITIONS)} the {c(PLACES)}."
    if kind == 1:
        adj = c(ADJECTIVES)
        return f"{c(NAMES)} {c(VERBS_PAST)} {_article(adj)} {adj} {c(THINGS)} {c(TIMES)}."
    if kind == 2:
        return f"{c(PRONOUNS)} {c(AUXILIARIES)} {c(VERBS_BASE)} the {c(THINGS)} {c(ADVERBS)}."
    if kind == 3:
        return f"Why did the {c(NOUNS)} {c(VERBS_BASE)} the {c(THINGS)} {c(PREPOSITIONS)} the {c(PLACES)}?"
    if kind == 4:
        a, b = r.sample(NAMES, 2)
        return f"{a} and {b} {c(VERBS_MOTION)} {c(PREPOSITIONS)} the {c(PLACES)} {c(TIMES)}."
    if kind == 5:
        return f"There are {c(NUMBERS)} {c(ADJECTIVES)} {_plural(c(THINGS))} in the {c(PLACES)}."
    if kind == 6:
        return f"{c(TIMES).capitalize()}, the {c(NOUNS)} {c(VERBS_MOTION)} {c(ADVERBS)} to the {c(PLACES)}."
    return f"Did {c(NAMES)} {c(VERBS_BASE)} the {c(ADJECTIVES)} {c(THINGS)}, or the {c(ADJECTIVES)} one?"


def generated_sentences(count: int, seed: int = 0, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct sentences, the same list for the same ``count`` and ``seed`` on every machine."""
    r = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        s = _sentence(r)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
