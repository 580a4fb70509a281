"""The tokenizer: the reference's ids, exact round trips on odd Unicode, left truncation, whole characters."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import load_tokenizer
from model.network.tokenizer import complete_utf8_prefix, load_tokenizer_folder
from model.network.tiny import corpus_lines

ODD_TEXTS = {
    "emoji": "I love 🤗 and 👩‍👩‍👧‍👦 and 👋🏽!",
    "combining": "e\u0301 n\u0303 a\u030a Z\u0351\u0352\u0353\u0354 q\u0307\u0323",
    "rtl": "مرحبا بالعالم — שלום עולם",
    "nul_control": "a\x00b\x01c\x1f\x7f\td\r\ne\x0b\x0c",
    "cjk": "日本語のテキストと中文文本，还有한국어.",
    "mixed": "  Leading spaces, \u00a0nbsp\u200bzwsp, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \ufeffBOM; tabs\t\tand\n\nnewlines  ",
    "plain": "The quick brown fox jumps over the lazy dog.",
    "empty": "",
}

TRAINING_TEXT = [
    *corpus_lines(),
    "日本語のテキスト 日本語のテキスト 中文文本 中文文本 한국어 한국어",
    "🤗🤗🤗 emoji 👋🏽👋🏽 emoji 😀😀😀 mixed with words",
    "مرحبا بالعالم مرحبا بالعالم שלום עולם שלום עולם",
]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A folder with only vocab.json + merges.txt from a ByteLevel BPE trained with `tokenizers`.

    Trained on some non-Latin text so that tokens span several bytes of multi-byte characters.
    Also returns the same tokenizer as a tokenizer.json in a second folder.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    folder = tmp_path_factory.mktemp("vocab-merges")
    tok.model.save(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    json_folder = tmp_path_factory.mktemp("tokenizer-json")
    tok.save(str(json_folder / "tokenizer.json"))
    return folder, json_folder


@pytest.fixture(scope="module")
def tokenizers(tiny_gpt2, bpe_folder):
    """Our tokenizer from each source, keyed by where it came from."""
    vm, tj = bpe_folder
    return {"tiny": load_tokenizer_folder(tiny_gpt2), "vocab_merges": load_tokenizer_folder(vm),
            "tokenizer_json": load_tokenizer_folder(tj)}


def reference_tokenizers(tiny_gpt2, bpe_folder):
    import transformers

    vm, tj = bpe_folder
    return {
        "tiny": transformers.GPT2TokenizerFast(tokenizer_file=str(tiny_gpt2 / "tokenizer.json")),
        "vocab_merges": transformers.GPT2Tokenizer.from_pretrained(str(vm)),
        "tokenizer_json": transformers.GPT2TokenizerFast(tokenizer_file=str(tj / "tokenizer.json")),
    }


# -- the reference's ids ------------------------------------------------------------------------

def test_ids_match_reference(tiny_gpt2, bpe_folder, tokenizers):
    refs = reference_tokenizers(tiny_gpt2, bpe_folder)
    texts = list(ODD_TEXTS.values()) + corpus_lines()[:5]
    for source, ours in tokenizers.items():
        ref = refs[source]
        for text in texts:
            expected = ref.encode(text, add_special_tokens=False)
            assert ours.encode(text) == expected, (source, text)
            assert ours.decode(expected) == ref.decode(expected), (source, text)


def test_vocab_merges_and_tokenizer_json_agree(tokenizers):
    for text in ODD_TEXTS.values():
        assert tokenizers["vocab_merges"].encode(text) == tokenizers["tokenizer_json"].encode(text)


def test_multibyte_merges_exist(tokenizers):
    """Guards the mid-character tests: some tokens hold part of a multi-byte character."""
    tok = tokenizers["vocab_merges"]
    partial = [b for b in tok.all_token_bytes() if b and complete_utf8_prefix(b) != b]
    assert partial


def test_eos_token(tiny_gpt2, tokenizers):
    config = json.loads((tiny_gpt2 / "config.json").read_text())
    assert tokenizers["tiny"].eos_token_id == config["eos_token_id"]
    assert tokenizers["vocab_merges"].eos_token_id is not None
    via_name = load_tokenizer(str(tiny_gpt2))  # the public entry point, given a local folder
    assert via_name.encode("some text") == tokenizers["tiny"].encode("some text")


# -- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ODD_TEXTS))
def test_round_trip(tokenizers, name):
    text = ODD_TEXTS[name]
    for source, tok in tokenizers.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, source
        assert tok.decode_bytes(ids) == text.encode("utf-8"), source


def test_no_prefix_space(tokenizers):
    for tok in tokenizers.values():
        ids = tok.encode("hello")
        assert tok.decode(ids) == "hello"
        assert tok.decode(ids[:1])[0] == "h"
        assert tok.encode("hello") != tok.encode(" hello")
        assert tok.encode("hello", add_prefix_space=True) == tok.encode(" hello")


def test_tokenizer_json_asking_for_a_prefix_space_gets_none(tmp_path, bpe_folder):
    """Some tokenizer.json files set add_prefix_space; GPT-2 text continues exactly, so it is ignored."""
    _, tj = bpe_folder
    raw = json.loads((tj / "tokenizer.json").read_text())
    assert raw["pre_tokenizer"]["type"] == "ByteLevel"
    raw["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    tok = load_tokenizer_folder(tmp_path)
    plain = load_tokenizer_folder(tj)
    assert tok.encode("hello there") == plain.encode("hello there")
    assert tok.decode(tok.encode("hello there")) == "hello there"


# -- left truncation ------------------------------------------------------------------------------

def test_left_truncation_keeps_the_last_tokens(tokenizers):
    tok = tokenizers["tiny"]
    text = " ".join(corpus_lines()[:3])
    ids = tok.encode(text)
    assert len(ids) > 20
    for n in (1, 5, 20, len(ids) - 1):
        cut = tok.encode(text, max_tokens=n)
        assert cut == ids[-n:]
        assert tok.decode(cut) and text.endswith(tok.decode(cut))
    assert tok.encode(text, max_tokens=len(ids)) == ids
    assert tok.encode(text, max_tokens=len(ids) + 50) == ids


# -- never half a character -----------------------------------------------------------------------

def test_decode_never_ends_in_half_a_character(tokenizers):
    tok = tokenizers["tiny"]
    ids = tok.encode("ab😀")
    # The emoji is 4 bytes; the tiny vocabulary spells it with byte tokens, so dropping the last
    # token leaves "ab" and the first bytes of the emoji.
    dropped = ids[:-1]
    assert tok.decode_bytes(dropped).startswith("ab".encode() + "😀".encode()[:1])
    text = tok.decode(dropped)
    assert text == "ab"
    assert "\ufffd" not in text


@pytest.mark.parametrize("name", ["emoji", "cjk", "rtl", "combining", "mixed"])
def test_every_prefix_decodes_to_whole_characters(tokenizers, name):
    full = ODD_TEXTS[name]
    for source, tok in tokenizers.items():
        ids = tok.encode(full)
        cut_inside = 0
        for k in range(len(ids) + 1):
            text = tok.decode(ids[:k])
            assert "\ufffd" not in text, (source, k)
            assert full.startswith(text), (source, k, text)
            cut_inside += len(text.encode()) < len(tok.decode_bytes(ids[:k]))
        if name in ("emoji", "cjk"):
            assert cut_inside > 0, source  # the test met at least one cut inside a character


@pytest.mark.parametrize("data,expected", [
    (b"", b""),
    (b"abc", b"abc"),
    ("é".encode(), "é".encode()),
    ("é".encode()[:1], b""),
    ("a😀".encode()[:4], b"a"),
    ("a😀".encode(), "a😀".encode()),
    ("日".encode()[:2], b""),
    ("x日".encode(), "x日".encode()),
])
def test_complete_utf8_prefix(data, expected):
    assert complete_utf8_prefix(data) == expected


# -- OpenAI GPT ------------------------------------------------------------------------------------

def test_openai_gpt_tokenizer(tiny_openai):
    import transformers

    ours = load_tokenizer_folder(tiny_openai)
    ref = transformers.OpenAIGPTTokenizerFast(tokenizer_file=str(tiny_openai / "tokenizer.json")) \
        if hasattr(transformers, "OpenAIGPTTokenizerFast") else transformers.OpenAIGPTTokenizer.from_pretrained(str(tiny_openai))
    for text in corpus_lines()[:5] + ["Hello, World! It is Lower-Cased."]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        # OpenAI GPT lower-cases and splits on punctuation: the words come back, not the exact bytes.
        assert ours.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_openai_gpt_from_vocab_and_merges(tiny_openai, tmp_path):
    tok = Tokenizer.from_file(str(tiny_openai / "tokenizer.json"))
    tok.model.save(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openai-gpt"}))
    from_files = load_tokenizer_folder(tmp_path)
    from_json = load_tokenizer_folder(tiny_openai)
    for text in corpus_lines()[:5]:
        assert from_files.encode(text) == from_json.encode(text)
        assert from_files.decode(from_files.encode(text)) == from_json.decode(from_json.encode(text))
