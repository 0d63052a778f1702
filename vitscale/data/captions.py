"""Synthetic image-text pairs: a stand-in for LAION until ``data/laion.py`` exists.

Each image of a synthetic generator (``vitscale.data.synthetic``) gets a caption that
describes it, so a CLIP model can be trained end to end in minutes
(``configs/clip_tiny.yaml``) with nothing downloaded:

    "a calm dark blue gratings pattern of kind three seven"
       |    |    |       |                      |
       |    |    |       generator name         class label, one word per decimal digit
       |    brightness and hue of the image's mean colour (informative, per image)
       an adjective drawn from the image's own random stream (varies per instance)

Every caption is a pure function of (generator, seed, label, instance), like the image,
so captions are identical on every rank, worker and machine and the loader keeps the
position-exact order of ``synthetic_loader.StepSampler``: every parallel layout and
every resume sees the same (image, caption) pairs in each optimizer step.

Tokens follow the conventions of OpenAI's CLIP, which ``models/clip.py`` relies on: a
start-of-text id first, an end-of-text (EOT) id right after the caption, zeros after it,
and EOT the largest id in the vocabulary, because the text tower pools at the argmax.
Real-size text towers (vocab 49408) get open_clip's BPE tokens; small test towers a
word tokenizer over the caption vocabulary below.
"""
from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitscale.data.synthetic import Generator, instance_rng
from vitscale.data.synthetic_loader import StepSampler, make_generator

__all__ = ["CAPTION_WORDS", "OPENAI_VOCAB_SIZE", "CaptionTokenizer", "SyntheticCaptions", "build_caption_loader",
           "class_phrase", "describe"]

OPENAI_VOCAB_SIZE = 49408  # OpenAI's BPE: 49406 = start of text, 49407 = end of text
CAPTION_STREAM = 0xCA97  # instance_rng stream of the caption; generators use streams 0-2

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = ("calm", "busy", "soft", "sharp", "small", "large", "plain", "fine", "bold", "faint", "smooth",
              "rough", "quiet", "loud", "simple", "complex")
BRIGHTNESS = ("black", "dark", "dim", "medium", "light", "bright")
# Upper bounds of the mean intensity (0-1) per BRIGHTNESS word. Roughly logarithmic: line drawings
# (bezier, rcdb) average a few percent ink, textures (gratings, dead leaves) about a half, and
# each generator should still spread over two or three words.
_BRIGHTNESS_BOUNDS = (0.012, 0.05, 0.15, 0.3, 0.5)
HUES = ("grey", "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
# Words of the registered generator names (a new generator adds its words here; a test checks).
GENERATOR_WORDS = ("atom", "bezier", "dead", "exfractal", "fractal", "gratings", "leaves", "perlin", "rcdb",
                   "visual")
FUNCTION_WORDS = ("a", "pattern", "of", "kind")
# The word tokenizer's vocabulary, in id order from 1 (0 is padding). "<unk>" stands for a word
# outside the list (a generator registered without adding its name's words above). Append only:
# ids of existing words must not move, or a model trained on them reads different captions.
CAPTION_WORDS: tuple[str, ...] = ("<unk>", *FUNCTION_WORDS, *DIGITS, *ADJECTIVES, *BRIGHTNESS, *HUES,
                                  *GENERATOR_WORDS)

# Hue bins of the mean colour, degrees: (upper bound, word); red wraps around 360.
_HUE_BINS = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"), (255, "blue"),
             (290, "purple"), (345, "pink"), (360, "red"))
_GREY_SATURATION = 0.12  # below: the mean colour reads as grey


def colour_words(image: np.ndarray) -> tuple[str, str]:
    """(brightness, hue) words of the mean colour of a (H, W, 3) uint8 image.

    Integer sums keep the result bit-exact on every machine.
    """
    total = image.reshape(-1, 3).sum(axis=0, dtype=np.int64)
    r, g, b = (int(c) / (255.0 * image.shape[0] * image.shape[1]) for c in total)
    hue, lightness, saturation = colorsys.rgb_to_hls(r, g, b)
    brightness = BRIGHTNESS[sum((r + g + b) / 3 >= bound for bound in _BRIGHTNESS_BOUNDS)]
    if saturation < _GREY_SATURATION or lightness < 0.05 or lightness > 0.95:
        return brightness, "grey"
    degrees = hue * 360.0
    return brightness, next(word for bound, word in _HUE_BINS if degrees < bound)


def describe(source: str, label: int, instance: int, seed: int, image: np.ndarray) -> str:
    """The caption of image ``instance`` of class ``label`` (``image``, (H, W, 3) uint8) of
    generator ``source`` with dataset seed ``seed``: a pure function of its arguments."""
    adjective = ADJECTIVES[int(instance_rng(seed, label, instance, stream=CAPTION_STREAM).integers(len(ADJECTIVES)))]
    brightness, hue = colour_words(image)
    return f"a {adjective} {brightness} {hue} {class_phrase(source, label)}"


def class_phrase(source: str, label: int) -> str:
    """The class-only part of a caption, e.g. "gratings pattern of kind three seven": the
    prompt for zero-shot classification of the synthetic classes."""
    return f"{source.replace('_', ' ')} pattern of kind {' '.join(DIGITS[int(d)] for d in str(label))}"


class CaptionTokenizer:
    """Captions -> int64 token ids (N, context_length), zero-padded, EOT the largest id.

    ``vocab_size == 49408`` gives open_clip's tokens (OpenAI's BPE; computed by ``clip_bpe.ClipBPE``
    on HF ``tokenizers``, the same ids), so real-size text towers see real tokens. Any other
    size uses a word tokenizer over ``CAPTION_WORDS``:
    word ``k`` of the list -> id ``k + 1``, start of text ``vocab_size - 2``, end of text
    ``vocab_size - 1``, padding 0. Captions longer than the context are cut, keeping EOT last.

    Args:
        vocab_size: the text tower's ``vocab_size``.
        context_length: the text tower's ``context_length`` (tokens per caption, SOT and EOT included).

    Raises:
        ValueError: ``context_length`` < 2, or ``vocab_size`` too small for the caption vocabulary.
    """

    def __init__(self, vocab_size: int = OPENAI_VOCAB_SIZE, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"text.context_length={context_length} leaves no room for the start- and end-of-text "
                             "tokens; use at least 2 (CLIP uses 77)")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.openai = vocab_size == OPENAI_VOCAB_SIZE
        if self.openai:
            self.sot_id, self.eot_id = OPENAI_VOCAB_SIZE - 2, OPENAI_VOCAB_SIZE - 1
            self._bpe = None  # built on first use (reads the merges file, builds the BPE model: ~0.3 s)
        else:
            needed = len(CAPTION_WORDS) + 3  # + padding, start and end of text
            if vocab_size < needed:
                raise ValueError(f"text.vocab_size={vocab_size} cannot hold the {len(CAPTION_WORDS)} caption words "
                                 f"plus padding, start and end of text; use text.vocab_size >= {needed}, or "
                                 f"{OPENAI_VOCAB_SIZE} for OpenAI's BPE tokens")
            self.sot_id, self.eot_id = vocab_size - 2, vocab_size - 1
            self._ids = {word: i + 1 for i, word in enumerate(CAPTION_WORDS)}

    def _bpe_tokenizer(self):
        if self._bpe is None:
            # open_clip's ids from HF tokenizers (clip_bpe.py): ~10x faster per caption than open_clip's own.
            from vitscale.data.clip_bpe import ClipBPE

            self._bpe = ClipBPE(context_length=self.context_length)
        return self._bpe

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: rebuild the BPE there
        return {**self.__dict__, "_bpe": None} if self.openai else dict(self.__dict__)

    def encode_words(self, text: str) -> list[int]:
        """Ids of the words of ``text`` (word tokenizer only), without start / end of text."""
        unk = self._ids["<unk>"]
        return [self._ids.get(word, unk) for word in text.lower().split()]

    def decode(self, ids) -> str:
        """One caption's token ids (a row of ``__call__``'s output) -> its text: the tokens between
        start and end of text (padding dropped); an id outside the word vocabulary reads ``<?>``."""
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        ids = [i for i in ids if i not in (0, self.sot_id)]
        if self.openai:
            return self._bpe_tokenizer().decode(ids).strip()
        return " ".join(CAPTION_WORDS[i - 1] if 0 < i <= len(CAPTION_WORDS) else "<?>" for i in ids)

    def open_clip_tokens(self) -> tuple[dict, list[int] | None]:
        """How ``open_clip.get_tokenizer`` reproduces this tokenizer from an exported model config:
        (entries for the config's ``text_cfg``, rows) where row ``i`` of the exported token
        embedding is row ``rows[i]`` of ours (None: ours as they are).

        OpenAI's BPE (``vocab_size == 49408``) is open_clip's own ``SimpleTokenizer``: only the
        context length. The word tokenizer has no open_clip form with our ids, so the export
        renumbers: open_clip's ``SimpleTokenizer`` with every caption word an additional special
        token (longest first, so a word is never cut at a shorter one) gives word ``j`` of that
        list id ``49408 + j``, start / end of text 49406 / 49407; the exported embedding holds our
        row of each; the text tower pools at the end-of-text id (``pool_type='eos'``), since
        EOT is no longer the largest id. Captions of words in ``CAPTION_WORDS`` give the same
        features; a word outside it is one ``<unk>`` here and BPE pieces there (each ``<unk>``'s row).
        """
        if self.openai:
            return {"context_length": self.context_length}, None
        words = sorted(CAPTION_WORDS, key=len, reverse=True)  # stable: ties keep CAPTION_WORDS' order
        unk = self._ids["<unk>"]
        rows = [unk] * (OPENAI_VOCAB_SIZE + len(words))
        rows[0] = 0  # padding
        rows[OPENAI_VOCAB_SIZE - 2], rows[OPENAI_VOCAB_SIZE - 1] = self.sot_id, self.eot_id
        for j, word in enumerate(words):
            rows[OPENAI_VOCAB_SIZE + j] = self._ids[word]
        text_cfg = {"context_length": self.context_length, "vocab_size": len(rows), "pool_type": "eos",
                    "eos_id": OPENAI_VOCAB_SIZE - 1, "tokenizer_kwargs": {"additional_special_tokens": words}}
        return text_cfg, rows

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (N, context_length) int64 of ``texts`` (a string counts as a list of one)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.openai:
            # open_clip cuts long captions keeping EOT last and pads with 0, as we do below.
            return self._bpe_tokenizer()(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode_words(text)[:self.context_length - 2], self.eot_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class SyntheticCaptions(Dataset):
    """Index ``i`` -> (image (3, H, W) uint8, token ids (context_length,) int64) of image
    ``i // num_classes`` of class ``i % num_classes``: the images of
    ``synthetic_loader.SyntheticClassification`` with a caption in place of the label.

    Args:
        generator: a registered generator instance.
        source: its registered name (it appears in the captions).
        instances: images per class; ``len(self) = num_classes * instances``.
        tokenizer: turns captions into ids; sized for the text tower.
    """

    def __init__(self, generator: Generator, source: str, instances: int, tokenizer: CaptionTokenizer):
        self.generator, self.source, self.instances, self.tokenizer = generator, source, instances, tokenizer

    def __len__(self) -> int:
        return self.generator.num_classes * self.instances

    def _split(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        return index % self.generator.num_classes, index // self.generator.num_classes

    def _render(self, label: int, instance: int) -> tuple[np.ndarray, str]:
        img = self.generator.render(label, instance)  # (H, W, 3) uint8
        return img, describe(self.source, label, instance, self.generator.seed, img)

    def caption(self, index: int) -> str:
        """The caption of sample ``index``, as text."""
        return self._render(*self._split(index))[1]

    def class_prompts(self) -> list[str]:
        """One prompt per class ("a gratings pattern of kind seven"), for zero-shot classification."""
        return [f"a {class_phrase(self.source, k)}" for k in range(self.generator.num_classes)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, text = self._render(*self._split(index))
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W)
        return image, self.tokenizer(text)[0]  # (context_length,)


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, 3, H, W) uint8, (B, context_length) int64
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def build_caption_loader(source: str, num_classes: int, image_size: int, instances: int, seed: int,
                         micro_batch: int, global_batch: int, data_rank: int, data_world: int,
                         start_step: int = 0, num_workers: int = 2, prefetch: int = 4, pin_memory: bool = False,
                         params: dict | None = None, context_length: int = 77,
                         vocab_size: int = OPENAI_VOCAB_SIZE) -> DataLoader:
    """An endless loader of (uint8 images (B, 3, H, W), int64 token ids (B, context_length))
    micro-batches of synthetic images and their captions, in the position-exact order of
    ``StepSampler`` (every layout and every resume sees the same pairs per step).

    Args:
        source: generator name (``vitscale.data.synthetic.list_generators()``).
        num_classes, image_size, instances: dataset shape; an epoch is num_classes * instances.
        seed: seeds the images, their captions and their order.
        micro_batch, global_batch, data_rank, data_world: see ``StepSampler``.
        start_step: optimizer step to start from (resume).
        num_workers, prefetch, pin_memory: as in ``torch.utils.data.DataLoader``.
        params: generator keyword arguments; ``categories`` may name a category file
            (``vitscale-synth search``) instead of holding the list.
        context_length, vocab_size: the text tower's; see ``CaptionTokenizer``.

    Returns:
        The loader; B = micro_batch.

    Raises:
        ValueError: an unknown generator, a vocabulary too small for the captions, or a
            global batch that is not a multiple of micro_batch x data_world.
    """
    tokenizer = CaptionTokenizer(vocab_size, context_length)
    generator = make_generator(source, num_classes, image_size, seed, params)
    dataset = SyntheticCaptions(generator, source, instances, tokenizer)
    sampler = StepSampler(len(dataset), micro_batch, global_batch, data_rank, data_world, seed, start_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=prefetch if num_workers > 0 else None)
