"""The HF-tokenizers BPE gives open_clip's own token ids (the reference: ``open_clip.tokenize``)."""
import pickle
import random

import pytest
import torch

from vitscale.data.clip_bpe import ClipBPE

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("tokenizers")

# Pieces of real-looking captions: ASCII words, mixed case, accents, other scripts, emoji, HTML
# entities (once and twice escaped), mojibake ftfy repairs, numbers, punctuation, contractions,
# fullwidth forms, ligatures, control characters, the special tokens' literals.
_PIECES = [
    "a", "photo", "of", "the", "Dog", "CAT", "on", "Sale", "NEW", "2024", "3.5mm", "#1", "$19.99", "50%",
    "don't", "WE'LL", "it's", "they're", "I'm", "you've", "he'd", "rock'n'roll", "--", "...", "!!!", "?",
    "(large)", "[HD]", "{x}", "a/b", "e-mail", "user@example.com", "https://example.com/a?b=1&c=2", "C++",
    "café", "Crème", "brûlée", "naïve", "Ñandú", "Zürich", "İstanbul", "straße", "ΑΘΗΝΑ", "Москва", "東京",
    "北京烤鸭", "서울", "مرحبا", "שלום", "हिन्दी", "ไทย", "😀", "🐱‍👤", "👍🏽", "🇫🇷", "❤️", "★", "©", "™", "°C", "½",
    "&amp;", "&#39;", "&quot;hi&quot;", "&lt;b&gt;", "&amp;amp;", "&amp;#39;", "&nbsp;", "&eacute;t&eacute;",
    "&#x2019;", "Ã©", "â€™s", "Ã¼ber", "ﬁne", "ﬂow", "ＡＢＣ", "１２３", "“quoted”", "‘single’", "–", "—", "…",
    "\t", "\n", "\r\n", "  ", "\u00a0", "\u200b", "\u3000", "\x1b[31m", "\x07", "\ufeff", "e\u0301", "<b>", "</w>",
    "<start_of_text>", "<end_of_text>", "!<start_of_text>", "<END_OF_TEXT>", "0", "12345678901234567890",
]


def _captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of any pieces, then ``n // 2`` of printable-ASCII pieces only (the tokenizer's
    shortcut: no ftfy, the ASCII form of the pattern)."""
    rng = random.Random(seed)
    ascii_pieces = [p for p in _PIECES if all(" " <= c <= "~" for c in p)]
    out = []
    for i in range(n + n // 2):
        words = rng.randint(1, 60 if i % 10 == 0 else 14)  # every tenth long: over 77 tokens, cut
        seps = [" ", " ", " ", "", "  ", ", ", "-"]
        pieces = _PIECES if i < n else ascii_pieces
        out.append("".join(rng.choice(pieces) + rng.choice(seps) for _ in range(words)))
    return out + ["", " ", "&", "A" * 300, "word " * 100]


def test_ids_equal_open_clips_on_thousands_of_captions():
    captions = _captions(2000)  # 3,005 captions
    ours = ClipBPE()(captions)
    theirs = open_clip.tokenize(captions)
    assert ours.dtype == theirs.dtype == torch.long and ours.shape == theirs.shape == (len(captions), 77)
    bad = [c for c, a, b in zip(captions, ours, theirs) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} captions differ, e.g. {bad[:3]!r}"
    assert (theirs[:, -1] != 0).sum() > 100  # long captions were cut (EOT last) in both


def test_other_context_lengths_and_pickling():
    captions = _captions(200, seed=1)
    tok = pickle.loads(pickle.dumps(ClipBPE(context_length=16)))  # DataLoader workers under spawn
    assert torch.equal(tok(captions), open_clip.tokenize(captions, context_length=16))
    assert tok.decode(tok("Hello World!")[0, 1:4].tolist()).strip() == "hello world !"
