"""OpenAI's CLIP BPE (open_clip's ``SimpleTokenizer``, ``clean='lower'``) on HF ``tokenizers``:
the same token ids, about ten times faster per caption on one core.

open_clip's tokenizer costs 0.06-0.25 ms per caption (ftfy, then a BPE loop in Python), a
quarter or more of decoding a 256-px JPEG. Here the merges run in ``tokenizers``' BPE model,
built from open_clip's own ``bpe_simple_vocab_16e6.txt.gz`` (the vocabulary and merges
``SimpleTokenizer`` builds, in its order) with GPT-2 / CLIP's byte-to-unicode mapping
(``tokenizers``' ``ByteLevel``, its own regex off) and ``</w>`` on each word's last symbol
(``end_of_word_suffix``). Ours, because ``tokenizers`` has no counterpart for it:

- the cleaning (ftfy's ``fix_text``, ``html.unescape`` twice, whitespace runs to one space, lower
  case), as Python string work, with one shortcut: a caption of printable ASCII (tabs and
  newlines allowed) without ``&`` is returned unchanged by ftfy (each of its fixes needs a
  non-ASCII character, ``&``, ``\\r``, ``ESC`` or another control character) and by
  ``html.unescape`` (needs ``&``), so ftfy runs only on the other captions;
- the pre-tokenisation: CLIP's regex through the ``regex`` module, as open_clip matches it (its
  ASCII form through ``re`` on the plain-ASCII captions of the shortcut above)
  (``<start_of_text>`` / ``<end_of_text>`` whole where the regex finds them, which ``tokenizers``'
  added tokens would not reproduce in every context), and a cache of each word's ids (open_clip
  caches its BPE per word too): a caption of seen words costs a regex and dict look-ups;
- SOT ... EOT, cut to the context keeping EOT last, zero padding (open_clip's rule).

``tests/data/test_clip_bpe.py`` checks the ids against ``open_clip.tokenize`` on thousands of
captions (Unicode, HTML entities, mojibake, long texts).
"""
from __future__ import annotations

import gzip
import html
import re
from pathlib import Path

import numpy as np
import torch

SOT, EOT = "<start_of_text>", "<end_of_text>"
# CLIP's pre-tokenisation (open_clip tokenizer.py): the special tokens whole, contractions, letters, a digit, others.
_PATTERN = "<start_of_text>|<end_of_text>|" + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Characters that neither ftfy.fix_text nor html.unescape change: printable ASCII but '&', tab, newline.
_PLAIN = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
# _PATTERN on what cleaning leaves of such a caption (printable ASCII, single spaces), where \p{L} is
# [A-Za-z], \p{N} [0-9] and \s the space: the standard library's engine, twice as fast as ``regex``.
_ASCII_WORDS = re.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""",
                          re.IGNORECASE | re.ASCII).findall
_MERGES = 49152 - 256 - 2  # merges SimpleTokenizer reads from the file (lines 1 .. 48894)


def _byte_alphabet() -> list[str]:
    """The 256 characters CLIP / GPT-2 map bytes 0..255 to, in SimpleTokenizer's vocabulary order
    (printable Latin-1 bytes as themselves first, then the rest shifted to U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


def default_vocab_file() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's merges), found without importing
    open_clip (which takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("OpenAI's BPE vocabulary ships with open_clip: pip install open_clip_torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clean(text: str) -> str:
    """SimpleTokenizer's ``clean='lower'``: ftfy, HTML entities (twice), whitespace runs, lower case."""
    if _PLAIN.fullmatch(text) is None:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipBPE:
    """Captions -> (N, context_length) int64 ids, equal to ``open_clip.tokenize`` (OpenAI's BPE).

    Args:
        context_length: tokens per caption, start and end of text included.
        vocab_file: the merges file (default: open_clip's).
        cache_words: words whose ids are remembered (cleared when full).

    Raises:
        ImportError: ``tokenizers`` (or open_clip, for the vocabulary) is not installed.
    """

    def __init__(self, context_length: int = 77, vocab_file: str | Path | None = None, cache_words: int = 200_000):
        try:
            from tokenizers import Tokenizer, models, pre_tokenizers
        except ImportError as exc:
            raise ImportError("OpenAI's BPE tokens (text.vocab_size 49408) need HF tokenizers: "
                              "pip install tokenizers") from exc
        import regex  # an open_clip dependency: \p{L} / \p{N} classes, as open_clip matches them

        self.vocab_file = Path(vocab_file) if vocab_file else default_vocab_file()
        self.context_length, self.cache_words = context_length, cache_words
        with gzip.open(self.vocab_file) as f:
            lines = f.read().decode("utf-8").split("\n")[1:_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        alphabet = _byte_alphabet()
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT, EOT]
        vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as SimpleTokenizer's dict
        self.sot_id, self.eot_id = vocab[SOT], vocab[EOT]
        tok = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
        # One word at a time: its bytes as CLIP's characters (ByteLevel's own regex off), then the merges.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._tok = tok
        self._words = regex.compile(_PATTERN, regex.IGNORECASE).findall
        # SimpleTokenizer's cache starts with the special tokens: the regex matches them whole.
        self._cache: dict[str, list[int]] = {}
        self._specials = {SOT: [self.sot_id], EOT: [self.eot_id]}
        self._slow = None

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: rebuilt there
        return {"context_length": self.context_length, "vocab_file": str(self.vocab_file),
                "cache_words": self.cache_words}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["context_length"], state["vocab_file"], state["cache_words"])

    def encode_one(self, text: str) -> list[int]:
        """Ids of one text, without start / end of text and uncut."""
        ids: list[int] = []
        cache = self._cache
        if _PLAIN.fullmatch(text) is not None:  # clean()'s shortcut, then the ASCII form of the pattern
            words = _ASCII_WORDS(" ".join(text.split()).lower())
        else:
            words = self._words(clean(text))
        for word in words:
            got = cache.get(word)
            if got is None:
                got = self._specials.get(word) or self._tok.encode(word, add_special_tokens=False).ids
                if len(cache) >= self.cache_words:
                    cache.clear()
                cache[word] = got
            ids += got
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids (no padding) -> text, as open_clip's ``SimpleTokenizer.decode``."""
        if self._slow is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._slow = SimpleTokenizer(str(self.vocab_file), context_length=self.context_length)
        return self._slow.decode(ids)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        context, keep = self.context_length, self.context_length - 2
        rows = []
        for text in texts:
            ids = self.encode_one(text)[:keep]  # open_clip cuts [SOT, ids..., EOT] to the context, EOT last
            rows += [self.sot_id, *ids, self.eot_id, *[0] * (keep - len(ids))]
        return torch.from_numpy(np.array(rows, np.int64).reshape(len(texts), context))
