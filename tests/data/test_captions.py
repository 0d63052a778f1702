"""Synthetic image-caption pairs: pure functions of (seed, label, instance), CLIP token conventions,
position-exact order across data-parallel layouts."""
import pickle

import pytest
import torch

from vitscale.data.captions import (CAPTION_WORDS, OPENAI_VOCAB_SIZE, CaptionTokenizer, SyntheticCaptions,
                                    build_caption_loader)
from vitscale.data.synthetic import create_generator, list_generators
from vitscale.data.transforms import normalize
from vitscale.models import create_model
from vitscale.models.clip import TextTower

VOCAB, CONTEXT = 1000, 16  # clip_tiny's text tower


def _dataset(source="gratings", seed=0, vocab=VOCAB, context=CONTEXT, classes=10, instances=20):
    return SyntheticCaptions(create_generator(source, classes, 32, seed), source, instances,
                             CaptionTokenizer(vocab, context))


def _check_rows(tokens: torch.Tensor, lengths: list[int], vocab: int):
    """SOT first, EOT (the largest id) right after the caption, zeros after it."""
    sot, eot = vocab - 2, vocab - 1
    for row, n in zip(tokens.tolist(), lengths):
        assert row[0] == sot
        assert row[n + 1] == eot and max(row) == eot and row.count(eot) == 1
        assert all(t != 0 for t in row[:n + 2]) and all(t == 0 for t in row[n + 2:])
    assert torch.equal(TextTower.eot_positions(tokens), torch.tensor([n + 1 for n in lengths]))


def test_samples_are_uint8_images_with_int64_tokens():
    ds = _dataset()
    assert len(ds) == 200
    image, tokens = ds[37]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert tokens.shape == (CONTEXT,) and tokens.dtype == torch.int64
    # The image is the generator's: label = i % classes, instance = i // classes.
    assert torch.equal(image, torch.from_numpy(ds.generator.render(7, 3)).permute(2, 0, 1))


@pytest.mark.parametrize("source", ["gratings", "dead_leaves"])
def test_samples_are_pure_functions_of_seed_label_instance(source):
    a, b = _dataset(source), _dataset(source)
    _ = b[0], b[150]  # call order must not matter
    for i in (3, 58, 199):
        (xa, ta), (xb, tb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and a.caption(i) == b.caption(i)
        assert torch.equal(a[i][1], ta)
    assert [_dataset(source, seed=1).caption(i) for i in range(40)] != [a.caption(i) for i in range(40)]


def test_tokens_follow_clip_conventions():
    ds = _dataset()
    captions = [ds.caption(i) for i in range(50)]
    tokens = torch.stack([ds[i][1] for i in range(50)])
    _check_rows(tokens, [len(c.split()) for c in captions], VOCAB)
    assert tokens[:, 1:].max() == VOCAB - 1 and tokens[tokens < VOCAB - 2].max() <= len(CAPTION_WORDS)


def test_captions_describe_class_and_instance():
    ds = _dataset(instances=10)
    by_class = [[ds.caption(label + 10 * inst) for inst in range(10)] for label in range(10)]
    # The class is in every caption, so no two classes share a caption ...
    assert all(not set(by_class[i]) & set(by_class[j]) for i in range(10) for j in range(i))
    for label, caps in enumerate(by_class):
        assert all(c.endswith(ds.class_prompts()[label][2:]) for c in caps)
        assert len(set(caps)) >= 5  # ... and instances of one class are told apart
    assert all(w in CAPTION_WORDS for caps in by_class for c in caps for w in c.split())


@pytest.mark.parametrize("source", list_generators())
def test_every_generator_name_is_in_the_caption_vocabulary(source):
    # A new generator must add its name's words to GENERATOR_WORDS, or its captions say "<unk>".
    assert all(w in CAPTION_WORDS for w in source.split("_"))


def test_long_captions_are_cut_keeping_eot_last():
    tok = CaptionTokenizer(VOCAB, 6)
    tokens = tok(["a calm dark blue gratings pattern of kind three seven", "a"])
    assert tokens.shape == (2, 6)
    assert tokens[0].tolist() == [VOCAB - 2, *tok.encode_words("a calm dark blue"), VOCAB - 1]
    _check_rows(tokens, [4, 1], VOCAB)


def test_too_small_vocabulary_is_a_clear_error():
    need = len(CAPTION_WORDS) + 3
    CaptionTokenizer(need, CONTEXT)
    with pytest.raises(ValueError, match=f"text.vocab_size={need - 1} .* use text.vocab_size >= {need}"):
        CaptionTokenizer(need - 1, CONTEXT)
    with pytest.raises(ValueError, match="text.vocab_size=50"):
        build_caption_loader("gratings", 10, 32, 20, 0, 4, 4, 0, 1, num_workers=0, context_length=16,
                             vocab_size=50)
    with pytest.raises(ValueError, match="context_length=1"):
        CaptionTokenizer(VOCAB, 1)


def test_real_vocabulary_uses_open_clips_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    ds = _dataset(vocab=OPENAI_VOCAB_SIZE, context=77)
    image, tokens = ds[12]
    assert tokens.shape == (77,) and tokens.dtype == torch.int64
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32")([ds.caption(12)])[0])
    eot = int(tokens.argmax())
    assert tokens[0] == 49406 and tokens[eot] == 49407 == OPENAI_VOCAB_SIZE - 1
    assert (tokens[1:eot] > 0).all() and (tokens[eot + 1:] == 0).all()
    # Workers started with spawn receive a pickled tokenizer; the BPE is rebuilt there.
    assert torch.equal(pickle.loads(pickle.dumps(ds.tokenizer))([ds.caption(12)])[0], tokens)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_is_position_exact_across_data_ranks():
    # Global batch 8 with 2 micro-batches per step: 1 rank x micro 4 against 2 ranks x micro 2.
    kw = dict(source="gratings", num_classes=10, image_size=32, instances=20, seed=3, global_batch=8,
              context_length=CONTEXT, vocab_size=VOCAB)
    ref = _take(build_caption_loader(**kw, micro_batch=4, data_rank=0, data_world=1, num_workers=2), 6)
    ranks = [_take(build_caption_loader(**kw, micro_batch=2, data_rank=r, data_world=2, num_workers=0), 6)
             for r in range(2)]
    for k, (images, tokens) in enumerate(ref):
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
        assert tokens.shape == (4, CONTEXT) and tokens.dtype == torch.int64
        assert torch.equal(images, torch.cat([ranks[0][k][0], ranks[1][k][0]]))
        assert torch.equal(tokens, torch.cat([ranks[0][k][1], ranks[1][k][1]]))
    # Resume at step 2 continues the same stream.
    resumed = _take(build_caption_loader(**kw, micro_batch=4, data_rank=0, data_world=1, num_workers=0,
                                         start_step=2), 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, ref[4:]))


def test_clip_tiny_takes_a_batch_forward_and_backward():
    images, tokens = next(iter(build_caption_loader("gratings", 10, 32, 20, 0, 8, 8, 0, 1, num_workers=0,
                                                    context_length=CONTEXT, vocab_size=VOCAB)))
    torch.manual_seed(0)
    model = create_model("clip_tiny")
    image_features, text_features, logit_scale = model(normalize(images, [0.5] * 3, [0.5] * 3), tokens)
    assert image_features.shape == text_features.shape == (8, 32)
    (image_features @ text_features.T * logit_scale).logsumexp(-1).mean().backward()


@pytest.mark.parametrize("vocab_size, context_length", [(OPENAI_VOCAB_SIZE, 77), (1000, 16)])
def test_open_clips_tokenizer_from_the_exported_config_gives_our_tokens(tmp_path, vocab_size, context_length):
    # What vitscale-export --to open_clip writes into text_cfg, read back by open_clip.get_tokenizer:
    # BPE towers get open_clip's own tokens; word towers the same tokens renumbered (rows[theirs] == ours).
    import json

    import open_clip

    ours = CaptionTokenizer(vocab_size, context_length)
    text_cfg, rows = ours.open_clip_tokens()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
    theirs = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    gen = create_generator("gratings", 20, 16, 0)
    captions = [SyntheticCaptions(gen, "gratings", 3, ours).caption(i) for i in range(0, 60, 7)]
    captions += ["a atom", "Atom  a", " ".join(CAPTION_WORDS[1:]), "<unk> dead leaves"]
    want, got = ours(captions), theirs(captions)
    assert got.shape == want.shape == (len(captions), context_length)
    if rows is None:
        assert torch.equal(got, want)
    else:
        assert len(rows) == text_cfg["vocab_size"] and got.max() < len(rows)
        assert torch.equal(torch.tensor(rows)[got], want)
        assert (got == text_cfg["eos_id"]).sum(-1).tolist() == [1] * len(captions)  # where the tower pools


def test_decode_is_the_tokenizers_inverse():
    """What the batch preview writes under a CLIP's images: the caption back from its tokens."""
    captions = ["a calm dark blue gratings pattern of kind three seven", "a bold red fractal pattern of kind one"]
    words = CaptionTokenizer(64, 12)  # the word tokenizer: 10 words fit between start and end of text
    tokens = words(captions)
    assert [words.decode(row) for row in tokens] == ["a calm dark blue gratings pattern of kind three seven",
                                                     "a bold red fractal pattern of kind one"]
    assert words.decode(CaptionTokenizer(64, 8)(captions[:1])[0]) == "a calm dark blue gratings pattern"
    bpe = CaptionTokenizer(OPENAI_VOCAB_SIZE, 77)  # open_clip's BPE
    assert [bpe.decode(row) for row in bpe(captions)] == captions
