"""Text tokenizers behind one interface: ``encode(text) -> list[int]`` and ``vocab_size``.

Six kinds, picked by name so a YAML can choose one:

* ``byte``: UTF-8 bytes, fixed vocabulary, no files. For tests and toy models, where no
  pretrained text embedding has to be matched.
* ``phoneme``: the bytes of espeak-ng's phonemes of the text (``phonemes.py``), same 257 ids, so an LLM
  learns sounds rather than English spelling.
* ``phone`` (the demo's): the same phonemes one id per phone (espeak-ng's en-us phoneme table, 257 ids):
  about 0.6 as many ids as ``phoneme``'s bytes, which keeps upstream's minimum of 2 speech tokens per text
  token below a sentence's real length.
* ``whisper``: upstream v1's text tokenizer (``whisper.tokenizer.get_tokenizer(multilingual=True,
  num_languages=100, language='en', task='transcribe')``, 51866 ids, the v1 ``text_token_size``).
  ``openai-whisper`` comes with the ``whisper``/``official``/``test`` extras; its wheel ships the
  ``multilingual.tiktoken`` vocabulary, read from the package folder (never the network). A
  ``multilingual.tiktoken`` given as ``path`` is used instead, with ``tiktoken`` alone (``tiktoken``'s
  own ``get_encoding`` would download; this builds the encoding from the local file). A missing
  package or file is a one-line error naming the extra to install.
* ``qwen``: upstream v2/v3's tokenizer, a Hugging Face tokenizer folder (``CosyVoice-BlankEN``)
  loaded with ``local_files_only=True`` (never the network) plus upstream's added special tokens,
  whose ids the pretrained LLM's text embedding depends on, so the list and its order are upstream's.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cosytrain.data.pipeline import DataError


class TokenizerUnavailableError(DataError):
    """The chosen tokenizer needs a package or file that is not there; the message names the fix."""


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by ``offset``; id 0 stays free because batches are padded with 0."""

    def __init__(self, offset: int = 1) -> None:
        if offset < 0:
            raise ValueError(f"byte tokenizer offset must be >= 0, got {offset}")
        self.offset = offset
        self.vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_lengths(self, texts: list[str]) -> list[int]:
        """``len(encode(t))`` for each text (the data index counts tokens of a whole corpus)."""
        return [len(t.encode("utf-8")) for t in texts]

    def decode(self, tokens: list[int]) -> str:
        return bytes(t - self.offset for t in tokens if self.offset <= t < self.vocab_size).decode(
            "utf-8", errors="replace")


class PhonemeTokenizer(ByteTokenizer):
    """The bytes of espeak-ng's phonemes of the text (``phonemes.py``): the demo LLM reads sounds, not
    spelling, so held-out sentences with words it never heard are still readable."""

    def encode(self, text: str) -> list[int]:
        from cosytrain.data.phonemes import phonemize

        return super().encode(phonemize(text))

    def encode_lengths(self, texts: list[str]) -> list[int]:
        from cosytrain.data.phonemes import phonemize

        return [len(phonemize(t).encode("utf-8")) for t in texts]


#: what a kind's output changed to in code (not in its vocabulary files or package), appended to the data index's
#: tokenizer identity (``index_build.tokenizer_identity``) so cached text-token lengths of the old output are not
#: reused; a kind never changed is absent, so its identity stays as it was. Add or bump an entry with such a change.
OUTPUT_REVISIONS = {"phone": "|v2"}  # v2: every text ends with the clause pause


class PhoneTokenizer:
    """One id per espeak-ng phone of the text (``phonemes.phone_sequence``): id ``1 + i`` for
    ``phonemes.PHONES[i]``, 256 for a name the table lacks; 0 stays free for padding.

    Every text ends with the clause pause (``phonemes.CLAUSE_PAUSE``), as the speech does: a zero-shot
    prompt's text then ends where the target's begins exactly as one sentence ends before the next in
    a two-sentence training utterance. Without it the demo LLM stopped right after the prompt (README,
    "What the demo sounds like").
    """

    def __init__(self) -> None:
        from cosytrain.data.phonemes import PHONES, UNKNOWN

        self.vocab_size = 257
        self.unknown_id = self.vocab_size - 1
        if len(PHONES) >= self.unknown_id:
            raise AssertionError("the phone table outgrew the 257 text ids")
        self._ids = {name: i + 1 for i, name in enumerate(PHONES)}
        self._names = {i: name for name, i in self._ids.items()} | {self.unknown_id: UNKNOWN}

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(name, self.unknown_id) for name in self._names_of(text)]

    def encode_lengths(self, texts: list[str]) -> list[int]:
        return [len(self._names_of(t)) for t in texts]

    @staticmethod
    def _names_of(text: str) -> tuple[str, ...]:
        from cosytrain.data.phonemes import CLAUSE_PAUSE, phone_sequence

        names = phone_sequence(text)
        return names + (CLAUSE_PAUSE,) if names and names[-1] != CLAUSE_PAUSE else names

    def decode(self, tokens: list[int]) -> str:
        """The phone names, space separated (for reading, not a round trip to text)."""
        return " ".join(self._names[t] for t in tokens if t in self._names)


# openai-whisper's language order; the first ``num_languages`` become <|xx|> special tokens.
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
    "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
    "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class WhisperTokenizer:
    """Whisper's multilingual BPE, encoding with every special token allowed (upstream: 'all')."""

    def __init__(self, path: str | None = None, num_languages: int = 100) -> None:
        self.num_languages = num_languages
        try:
            import whisper.tokenizer as wt  # type: ignore[import-not-found]
        except ImportError:
            wt = None
        if wt is not None and path is None:
            tok = wt.get_tokenizer(multilingual=True, num_languages=num_languages, language="en",
                                   task="transcribe")
            self._encoding = tok.encoding
        else:
            self._encoding = _tiktoken_whisper_encoding(path, num_languages)
        self.vocab_size = int(self._encoding.n_vocab)

    def encode(self, text: str) -> list[int]:
        return list(self._encoding.encode(text, allowed_special="all"))

    def encode_lengths(self, texts: list[str]) -> list[int]:
        """``len(encode(t))`` for each text, through tiktoken's threaded batch encoder."""
        return [len(ids) for ids in self._encoding.encode_batch(list(texts), allowed_special="all")]

    def decode(self, tokens: list[int]) -> str:
        return self._encoding.decode(list(tokens))


def _tiktoken_whisper_encoding(path: str | None, num_languages: int) -> Any:
    """Rebuild openai-whisper's ``get_encoding('multilingual')`` from its vocabulary file."""
    try:
        import tiktoken  # type: ignore[import-not-found]
    except ImportError as ex:
        raise TokenizerUnavailableError(
            "the whisper text tokenizer (CosyVoice 1) needs openai-whisper: pip install 'cosytrain[whisper]'"
            " (or tiktoken plus text_tokenizer_path=<multilingual.tiktoken>)") from ex
    if path is None:
        raise TokenizerUnavailableError(
            "the whisper text tokenizer (CosyVoice 1) needs openai-whisper: pip install 'cosytrain[whisper]'"
            " (or set text_tokenizer_path to a copy of its multilingual.tiktoken)")
    vocab = Path(path)
    if vocab.is_dir():
        vocab = vocab / "multilingual.tiktoken"
    if not vocab.is_file():
        raise TokenizerUnavailableError(f"whisper vocabulary {vocab} not found; point text_tokenizer_path at "
                                        "openai-whisper's assets/multilingual.tiktoken, or leave it unset with"
                                        " openai-whisper installed (pip install 'cosytrain[whisper]')")
    ranks = {base64.b64decode(tok): int(rank)
             for tok, rank in (line.split() for line in vocab.read_text().splitlines() if line)}
    specials = ["<|endoftext|>", "<|startoftranscript|>",
                *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES[:num_languages]],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    n = len(ranks)
    return tiktoken.Encoding(name=vocab.name, explicit_n_vocab=n + len(specials), pat_str=_GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={s: n + i for i, s in enumerate(specials)})


# Upstream cosyvoice/tokenizer/tokenizer.py adds these (in this order) on top of the BlankEN folder.
QWEN_V2_SPECIALS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
_V3_PHONES = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 B CH D DH EH "
    "EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH K L M N NG OW OW0 OW1 "
    "OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH "
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng "
    "ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u uang "
    "ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi uǎn uǎng "
    "uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò "
    "òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn "
    "ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split()
QWEN_V3_SPECIALS = QWEN_V2_SPECIALS + ("<|endofsystem|>",) + tuple(f"[{p}]" for p in _V3_PHONES)


class QwenTokenizer:
    """A local Hugging Face tokenizer folder plus upstream's special tokens for v2 or v3."""

    def __init__(self, path: str, version: str = "cosyvoice2") -> None:
        if version not in ("cosyvoice2", "cosyvoice3"):
            raise ValueError(f"qwen tokenizer version must be 'cosyvoice2' or 'cosyvoice3', got {version!r}")
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerUnavailableError(
                f"qwen tokenizer folder {folder} not found; point text_tokenizer_path at the model's "
                "CosyVoice-BlankEN folder")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        specials = QWEN_V3_SPECIALS if version == "cosyvoice3" else QWEN_V2_SPECIALS
        self._tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                      "additional_special_tokens": list(specials)})
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok([text])["input_ids"][0])

    def encode_lengths(self, texts: list[str], chunk: int = 4096) -> list[int]:
        """``len(encode(t))`` for each text, in batched calls of the fast (Rust) tokenizer."""
        out: list[int] = []
        for i in range(0, len(texts), chunk):
            out += [len(ids) for ids in self._tok(list(texts[i:i + chunk]))["input_ids"]]
        return out

    def decode(self, tokens: list[int]) -> str:
        return self._tok.decode(list(tokens), skip_special_tokens=True)


TOKENIZER_KINDS = ("byte", "phoneme", "phone", "whisper", "qwen", "qwen3")


@lru_cache(maxsize=8)
def build_text_tokenizer(kind: str = "byte", path: str | None = None) -> TextTokenizer:
    """Build (once per process) the tokenizer named ``kind``; ``qwen3`` is ``qwen`` with v3's tokens."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "phoneme":
        return PhonemeTokenizer()
    if kind == "phone":
        return PhoneTokenizer()
    if kind == "whisper":
        return WhisperTokenizer(path)
    if kind in ("qwen", "qwen2", "qwen3"):
        if path is None:
            raise TokenizerUnavailableError(f"text_tokenizer={kind!r} needs text_tokenizer_path=<CosyVoice-BlankEN folder>")
        return QwenTokenizer(path, version="cosyvoice3" if kind == "qwen3" else "cosyvoice2")
    raise DataError(f"unknown text tokenizer {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
