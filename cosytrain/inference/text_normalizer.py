"""The inference front end's text normaliser: text -> the pieces the LLM synthesises one by one.

Upstream uses ttsfrd or wetext, which are not required here; this normaliser is deliberately small
and the same for every generation:

* text containing ``<|`` and ``|>`` (upstream's SSML-like tags) is passed through untouched;
* whitespace is collapsed; in Chinese text, blanks between non-ASCII characters are removed,
  ``²``/``³`` become 平方/立方, ``.`` becomes 。 and ``' - '`` becomes ，, brackets are dropped (upstream's
  own post-processing after its normaliser);
* English text: runs of digits are spelled out (``21`` -> ``twenty-one``; digits after a decimal
  point one by one), the cheap part of upstream's ``inflect`` step; no dates, currencies or units;
* the text is cut after sentence punctuation and the sentences are merged greedily into pieces of
  60-80 tokens (Chinese: characters), a short tail (< 20) joining the previous piece, as upstream's
  ``split_paragraph``; pieces with only punctuation are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Sequence

__all__ = ["text_normalize", "split_paragraph", "spell_out_numbers", "number_to_words", "contains_chinese",
           "is_only_punctuation"]

_CHINESE_RE = re.compile(r"[\u4e00-\u9fff]")
_SENTENCE_END = set("。？！；：、?!;")  # '.' is handled separately (decimal points, abbreviations)
_CLOSING_QUOTES = set("\"”’'")
_PUNCT_OR_SPACE_RE = re.compile(r"^[\s\W_]*$", re.UNICODE)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))


def contains_chinese(text: str) -> bool:
    return bool(_CHINESE_RE.search(text))


def is_only_punctuation(text: str) -> bool:
    return bool(_PUNCT_OR_SPACE_RE.match(text))


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds:
        words.append(f"{_ONES[hundreds]} hundred")
    if rest:
        if hundreds:
            words.append("and")  # inflect's (British) style, which upstream's front end produces
        if rest < 20:
            words.append(_ONES[rest])
        else:
            tens, ones = divmod(rest, 10)
            words.append(_TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    return " ".join(words)


def number_to_words(n: int) -> str:
    """English cardinal for 0 <= n < 10**15 in inflect's style, without its commas ("one thousand and five")."""
    if n < 0 or n >= 10 ** 15:
        raise ValueError(f"number_to_words: {n} out of range")
    if n == 0:
        return "zero"
    words = []
    for scale, name in _SCALES:
        if n >= scale:
            words.append(f"{_below_thousand(n // scale)} {name}")
            n %= scale
    if n:
        if words and n < 100:
            words.append("and")
        words.append(_below_thousand(n))
    return " ".join(words)


def spell_out_numbers(text: str) -> str:
    """Spell out digit runs: ``3.14`` -> ``three point one four``, ``1,000`` -> ``one thousand``."""

    def replace(match: re.Match[str]) -> str:
        whole, frac = match.group(1).replace(",", ""), match.group(2)
        if len(whole) > 15:  # a long id or phone number: digit by digit
            out = " ".join(_ONES[int(d)] for d in whole)
        else:
            out = number_to_words(int(whole))
        if frac:
            out += " point " + " ".join(_ONES[int(d)] for d in frac)
        return out

    return re.sub(r"(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?", replace, text)


def _cut_sentences(text: str) -> list[str]:
    """Cut after sentence punctuation (a closing quote stays with its sentence)."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        c = text[i]
        end = c in _SENTENCE_END or (c == "." and (i + 1 == len(text) or text[i + 1].isspace()
                                                    or text[i + 1] in _CLOSING_QUOTES))
        if end:
            j = i + 1
            while j < len(text) and text[j] in _CLOSING_QUOTES:
                j += 1
            if text[start:j].strip():
                pieces.append(text[start:j])
            start, i = j, j
            continue
        i += 1
    if text[start:].strip():
        pieces.append(text[start:])
    return pieces


def split_paragraph(text: str, tokenize: Callable[[str], Sequence[int]], lang: str = "en", token_max_n: int = 80,
                    token_min_n: int = 60, merge_len: int = 20) -> list[str]:
    """Sentences merged greedily into pieces of about ``token_min_n``..``token_max_n`` units.

    Units are tokens for English, characters for Chinese (upstream's choice: Chinese BPE pieces vary
    too much). A piece is closed when adding the next sentence would pass ``token_max_n`` and the
    piece already has more than ``token_min_n``; a last piece shorter than ``merge_len`` joins the
    one before. Text without final punctuation gets one (``.`` or ``。``).
    """
    text = text.strip()
    if not text:
        return []

    def size(s: str) -> int:
        return len(s) if lang == "zh" else len(tokenize(s))

    if text[-1] not in _SENTENCE_END and text[-1] != "." and text[-1] not in _CLOSING_QUOTES:
        text += "。" if lang == "zh" else "."
    pieces: list[str] = []
    current = ""
    for sentence in _cut_sentences(text):
        if current and size(current + sentence) > token_max_n and size(current) > token_min_n:
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if pieces and size(current) < merge_len:
            pieces[-1] += current
        else:
            pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def _normalize_chinese(text: str) -> str:
    text = text.replace("\n", "")
    # drop blanks between non-ASCII characters; keep them between ASCII words
    text = re.sub(r"(?<=[^\x00-\x7f])\s+|\s+(?=[^\x00-\x7f])", "", text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。").replace(" - ", "，")
    text = re.sub(r"[（）()【】\[\]`]", "", text).replace("——", " ")
    return re.sub(r"[，,、]+$", "。", text)


def text_normalize(text: str, tokenize: Callable[[str], Sequence[int]], split: bool = True,
                   text_frontend: bool = True) -> list[str] | str:
    """Upstream's ``text_normalize`` contract: a list of pieces (``split=True``) or one string."""
    if "<|" in text and "|>" in text:  # tagged text is the caller's exact input, as upstream
        text_frontend = False
    if not text_frontend or text == "":
        return [text] if split else text
    text = text.strip()
    if contains_chinese(text):
        text = _normalize_chinese(text)
        lang = "zh"
    else:
        text = " ".join(spell_out_numbers(text).split())
        lang = "en"
    if not split:
        return text
    pieces = split_paragraph(text, tokenize, lang)
    return [p for p in pieces if not is_only_punctuation(p)]
