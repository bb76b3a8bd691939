"""Tokenizers: id layout, truncation, round trips, serialisation, word positions, errors."""

import json
import pickle
import re
import warnings

import pytest
import torch

from mmxattn.text.tokenizer import (
    OpenCLIPTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

CORPUS = ["A red square above a blue circle.", "a green triangle left of a red square", "Two circles!", "a ! mark"]


@pytest.fixture(scope="module")
def bpe() -> OpenCLIPTokenizer:
    return OpenCLIPTokenizer(context_length=16)


@pytest.fixture()
def word() -> WordTokenizer:
    return WordTokenizer.build(CORPUS, context_length=8)


def _layout_ok(tok, ids: torch.Tensor, n_content: int) -> None:
    assert ids[0] == tok.bos_id
    assert ids[n_content + 1] == tok.eos_id
    assert (ids[n_content + 2 :] == tok.pad_id).all()
    content = ids[1 : n_content + 1]
    assert not torch.isin(content, torch.tensor([tok.bos_id, tok.eos_id, tok.pad_id])).any()


# ----------------------------------------------------------------------------------------------------- BPE


def test_bpe_ids_match_open_clip_and_pad_is_its_own_id(bpe):
    import open_clip

    assert isinstance(bpe, Tokenizer)
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.vocab_size) == (49406, 49407, 49408, 49409)
    texts = ["a photo of a cat", "two dogs playing in the snow"]
    ours = bpe(texts)
    ref = open_clip.tokenize(texts, context_length=16)  # outside reference: same ids, but pads with 0
    assert ours.shape == (2, 16) and ours.dtype == torch.long
    not_pad = ref != 0
    assert torch.equal(ours[not_pad], ref[not_pad])
    assert (ours[~not_pad] == bpe.pad_id).all()
    _layout_ok(bpe, ours[0], n_content=5)


def test_bpe_exclamation_token_zero_survives(bpe):
    # "!~" encodes with BPE id 0 ("!"), the id open_clip also uses for padding
    ids = bpe("wow !~")[0]
    assert 0 in ids[1:-1].tolist()
    assert bpe.decode(ids) == "wow !~"
    assert bpe.batch_decode(bpe(["hello!", "!"])) == ["hello !", "!"]


def test_bpe_round_trip(bpe):
    for text in ["a photo of a cat", "the dog's ball, red and blue.", "", "x!x", "café au lait"]:
        ids = bpe(text)
        decoded = bpe.decode(ids[0])
        assert torch.equal(bpe(decoded), ids), (text, decoded)  # id-level round trip
    assert bpe.decode(bpe("A Photo OF a Cat")[0]) == "a photo of a cat"  # "lower" cleaning


def test_bpe_empty_string_and_eos_stop(bpe):
    ids = bpe("")[0]
    assert ids[:2].tolist() == [bpe.bos_id, bpe.eos_id] and (ids[2:] == bpe.pad_id).all()
    assert bpe.decode(ids) == ""
    seq = bpe("a cat")[0].tolist()
    # content after the first eos is ignored; a leading bos and pads are dropped
    assert bpe.decode(seq[:4] + bpe("dog")[0].tolist()[1:3]) == "a cat"


def test_bpe_serialisation_round_trip(tmp_path, bpe):
    d = bpe.to_dict()
    assert d["type"] == "open_clip_bpe" and d["context_length"] == 16 and "open_clip_version" in d
    assert len(json.dumps(d)) < 1000  # settings, not the 49k vocabulary
    path = bpe.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, OpenCLIPTokenizer)
    texts = ["a photo of a cat!", "wow !~", "a " * 30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded(texts), bpe(texts))
    assert loaded.batch_decode(bpe(texts)) == bpe.batch_decode(bpe(texts))
    # a vocabulary fingerprint mismatch warns
    with pytest.warns(UserWarning, match="BPE vocabulary"):
        tokenizer_from_dict({**d, "bpe_sha256": "0" * 64})
    assert pickle.loads(pickle.dumps(bpe)).to_dict() == d


@pytest.mark.parametrize("clean", ["lower", "whitespace"])
def test_bpe_text_spelling_a_special_token_is_ordinary_text(clean):
    """open_clip's pattern matches "<end_of_text>" / "<start_of_text>" (any case) as the special ids: a caption
    holding that text (alt-text, code) got an eos mid-caption and lost its end. User text never yields specials."""
    tok = OpenCLIPTokenizer(context_length=32, clean=clean)
    plain = tok(["html tag on a sign"])[0]
    for cap in ["html tag <end_of_text> on a sign", "a <start_of_text> b", "x <END_OF_TEXT>y", "&lt;end_of_text&gt;"]:
        ids = tok(cap)[0]
        n = int((ids != tok.pad_id).sum()) - 2
        _layout_ok(tok, ids, n_content=n)  # one bos, one eos at the end, no special id in between
        assert (ids == tok.eos_id).sum() == 1 and (ids == tok.bos_id).sum() == 1, cap
        text = tok.decode(ids)
        assert "of" in text.lower() and "text" in text.lower(), (cap, text)  # nothing after it was lost
        assert torch.equal(tok(text)[0], ids)  # decode -> encode round trip still holds
    # ordinary text encodes exactly as open_clip's own tokenizer (pattern only lost its special alternatives)
    assert torch.equal(plain[plain != tok.pad_id][1:-1], torch.tensor(tok._bpe.encode("html tag on a sign")))


# ----------------------------------------------------------------------------------------------------- word


def test_word_vocab_layout_and_build(word):
    assert word.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (word.pad_id, word.bos_id, word.eos_id, word.unk_id) == (0, 1, 2, 3)
    assert word.vocab[4] == "a"  # most frequent first
    assert "square" in word.vocab and "square." not in word.vocab and "!" in word.vocab
    assert word.vocab_size == len(word.vocab)
    assert WordTokenizer.build(CORPUS, min_freq=2).vocab[4:] == ["a", "red", "square"]
    assert WordTokenizer.build(CORPUS, max_size=2).vocab[4:] == ["a", "red"]
    assert isinstance(word, Tokenizer)


def test_word_round_trip_and_layout(word):
    ids = word("A red square!")
    assert ids.shape == (1, 8)
    _layout_ok(word, ids[0], n_content=3)
    assert word.decode(ids[0]) == "a red square"
    assert word.batch_decode(word(["a ! mark", "Two circles"])) == ["a ! mark", "two circles"]
    assert word.batch_decode([[1, 4, 2], torch.tensor([1, 2, 0])]) == ["a", ""]
    empty = word("")[0]
    assert empty[:2].tolist() == [1, 2] and (empty[2:] == 0).all()


def test_word_unknown_words(word):
    ids = word("a purple square")[0]
    assert ids[2] == word.unk_id
    assert word.decode(ids) == "a <unk> square"


def test_unknown_words_are_the_words_encoding_reads_as_unk(word, bpe):
    """``unknown_words``: per text, the words as written that encode to ``<unk>`` (what the model's warning names);
    normalisation is applied (case, punctuation), a typed "<unk>" is unknown, and BPE knows every word."""
    texts = ["A purple square.", "Hexagon, zzz qqq zzz", "a red circle", "<unk> square"]
    assert word.unknown_words(texts) == [["purple"], ["Hexagon,", "zzz", "qqq", "zzz"], [], ["<unk>"]]
    assert word.unknown_words("Red octagon") == [["octagon"]]
    ids = word(texts, context_length=8)
    for t, unknown, row in zip(texts, word.unknown_words(texts), ids):  # one whitespace word is one token
        assert [w for w, i in zip(t.split(), row[1:].tolist()) if i == word.unk_id] == unknown
    assert bpe.unknown_words(["zzz qqq", "a hexagon"]) == [[], []] and bpe.unknown_words("x") == [[]]
    with pytest.raises(TypeError, match="must be a str"):
        word.unknown_words(["a", 3])


def test_word_positions_match_split(word):
    text = "A red square above a blue circle."
    ids = word(text, context_length=12)[0]
    positions = word.word_token_positions(text, context_length=12)
    assert positions == list(range(1, 8))
    for w, p in zip(text.split(), positions):
        assert word.vocab[ids[p]] == WordTokenizer.normalize_word(w)
    # words cut off by truncation get -1 (context 8 -> 6 words fit)
    assert word.word_token_positions(text) == [1, 2, 3, 4, 5, 6, -1]
    # punctuation-only words are kept as their own token, so positions never shift
    assert word.word_token_positions("a ! mark") == [1, 2, 3] and word("a ! mark")[0, 2] == word.vocab.index("!")


def test_word_serialisation_round_trip(tmp_path, word):
    word.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.vocab == word.vocab and loaded.context_length == word.context_length
    texts = CORPUS + ["unknown words here"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded(texts), word(texts))
    assert tokenizer_from_dict(json.loads(json.dumps(word.to_dict()))).vocab == word.vocab


def test_word_tokenizer_unicode_normalises_words():
    """NFC ("café" precomposed) and NFD (decomposed, e.g. text from macOS) spellings are one word, in the
    vocabulary and when encoding."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Café crème") for form in ("NFC", "NFD"))
    assert nfc != nfd
    tok = WordTokenizer.build([nfc, nfd, "café"], context_length=8)
    assert tok.vocab[4:] == ["café", "crème"] and all(unicodedata.is_normalized("NFC", w) for w in tok.vocab)
    assert torch.equal(tok(nfd), tok(nfc)) and tok.unk_id not in tok(nfd)[0].tolist()
    assert WordTokenizer.normalize_word(nfd.split()[0]) == WordTokenizer.normalize_word(nfc.split()[0]) == "café"


def test_word_vocab_saved_in_another_normal_form_still_loads_and_matches_both_spellings(tmp_path):
    """A vocabulary built before normalisation may hold NFD words: it loads, keeps its ids, and both spellings of
    such a word find its entry (an NFC entry of its own, where one exists, keeps its id)."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    old = {"type": "word", "context_length": 6, "vocab": [*WordTokenizer.SPECIALS, nfd, "crème"]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(old, ensure_ascii=False), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.vocab == old["vocab"] and tok.vocab_size == 6
    assert tok(nfc)[0, 1] == tok(nfd)[0, 1] == 4
    both = tokenizer_from_dict({**old, "vocab": [*WordTokenizer.SPECIALS, nfd, nfc]})
    assert both(nfd)[0, 1] == both(nfc)[0, 1] == 5  # the NFC entry
    assert both.decode([1, 4, 5, 2]) == f"{nfd} {nfc}"  # every saved id still decodes


def test_word_text_spelling_a_special_token_is_a_word():
    tok = WordTokenizer.build(["a pad b", "<eos> here"], context_length=8)
    for text in ["a <pad> b", "<eos> here", "<bos> <unk>"]:
        ids = tok(text)[0]
        n = len(text.split())
        _layout_ok(tok, ids, n_content=n)
    assert tok.decode(tok("a <pad> b")[0]) == "a pad b"


# ----------------------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_truncation_keeps_bos_eos_and_warns_once(which, word):
    tok = word if which == "word" else OpenCLIPTokenizer(context_length=8)
    long_text = " ".join(["a"] * 10)  # 10 tokens in both, 6 fit
    with pytest.warns(UserWarning, match=r"context_length=8.*lost 4 token"):
        ids = tok(long_text)[0]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and (ids != tok.pad_id).all()
    assert tok.decode(ids) == " ".join(["a"] * (tok.context_length - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second truncation by the same instance is silent
        tok([long_text, long_text])
    assert tok("a", context_length=4).shape == (1, 4)  # per-call context length


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_errors(which, word, bpe):
    tok = word if which == "word" else bpe
    with pytest.raises(TypeError, match="texts\\[1\\] must be a str, got int"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="must be a str or a list of str"):
        tok(None)
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} .*\\[0, {tok.vocab_size}\\)"):
        tok.decode([tok.bos_id, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        tok.batch_decode(torch.tensor([[tok.bos_id, -1]]))
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)


@pytest.mark.parametrize("which, missing", [("word", "context_length"), ("word", "vocab"), ("bpe", "context_length")])
def test_a_dict_without_a_field_names_it_not_a_bare_key_error(which, missing, word, bpe, tmp_path):
    d = (word if which == "word" else bpe).to_dict()
    d.pop(missing)
    with pytest.raises(ValueError, match=f"the tokenizer dict \\(type '{d['type']}'\\) has no '{missing}' field"):
        tokenizer_from_dict(d)
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: invalid tokenizer file: .*has no '{missing}' field"):
        load_tokenizer(tmp_path)


def test_invalid_fields_name_the_field_and_the_file(word, bpe, tmp_path):
    file = tmp_path / "tokenizer.json"
    for d, match in (
        ({**word.to_dict(), "context_length": "8"}, "field 'context_length' must be an int, got str '8'"),
        ({**word.to_dict(), "context_length": 7.9}, "field 'context_length' must be an int, got float 7.9"),
        ({**word.to_dict(), "vocab": "<pad> <bos>"}, "field 'vocab' must be a list of str, got str"),
        ({**bpe.to_dict(), "clean": None}, "field 'clean' must be a str, got NoneType"),
        ({"type": ["word"]}, r"unknown tokenizer type \['word'\]"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            tokenizer_from_dict(d)
        file.write_text(json.dumps(d))
        with pytest.raises((TypeError, ValueError), match=f"{re.escape(str(file))}: invalid tokenizer file: .*{match}"):
            load_tokenizer(file)
    file.write_text('{"type": "word", ')
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: not a tokenizer file, not readable JSON"):
        load_tokenizer(file)


def test_an_exported_tokenizer_json_without_a_field_names_the_file_and_the_field(tmp_path):
    import mmxattn
    from mmxattn.checkpoint import CheckpointError

    tok = WordTokenizer([*WordTokenizer.SPECIALS, *(f"w{i}" for i in range(60))])
    d = mmxattn.export(mmxattn.create_model("mmx_tiny", tokenizer=tok), tmp_path / "exp")
    saved = json.loads((d / "tokenizer.json").read_text())
    del saved["context_length"]
    (d / "tokenizer.json").write_text(json.dumps(saved))
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: invalid tokenizer settings: .*no 'context_length' field"
    ):
        mmxattn.load(d)


def test_bad_dicts_and_vocab():
    with pytest.raises(ValueError, match="unknown tokenizer type 'nope'"):
        tokenizer_from_dict({"type": "nope"})
    with pytest.raises(ValueError, match="'type' key"):
        tokenizer_from_dict({"vocab": []})
    with pytest.raises(ValueError, match="must start with the specials"):
        WordTokenizer(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"])
    with pytest.raises(TypeError, match="single str"):
        WordTokenizer.build("a red square")
    with pytest.raises(ValueError, match="clean"):
        OpenCLIPTokenizer(clean="nope")
