"""The tokenizer, through the `tokenizers` library, with GPT-2's byte-level semantics.

Adds what autocomplete needs on top: the exact bytes of every token (to decode a
continuation without ever ending in half of a UTF-8 character, and to constrain a
healed token to the typed characters) and left truncation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from printable stand-in characters back to raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def complete_utf8_prefix(data: bytes) -> bytes:
    """`data` without a trailing incomplete UTF-8 sequence."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        b = data[end - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return data if back >= need else data[: end - back]
    return data


class GPTTokenizer:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, tokenizer: Tokenizer, byte_level: bool, eos_token_id: Optional[int]):
        self.tokenizer = tokenizer
        # A person typing "<|endoftext|>" means the characters, not the end-of-text token.
        tokenizer.encode_special_tokens = True
        self.byte_level = byte_level
        self.eos_token_id = eos_token_id
        self.vocab_size = tokenizer.get_vocab_size()
        self._bytes: Optional[list[bytes]] = None

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str, add_prefix_space: bool = False, max_tokens: Optional[int] = None) -> list[int]:
        """Token ids of `text`; with `max_tokens`, only the last ones (left truncation)."""
        if add_prefix_space and not text.startswith(" "):
            text = " " + text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[len(ids) - max_tokens:]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    # -- decoding -------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        table = self.all_token_bytes()
        return table[token_id] if 0 <= token_id < len(table) else b""  # ids past the tokenizer: padding

    def all_token_bytes(self) -> list[bytes]:
        """The raw bytes each token stands for (what the text gains when it is appended)."""
        if self._bytes is None:
            table = [b""] * self.vocab_size
            dec = _byte_decoder()
            for token, idx in self.tokenizer.get_vocab().items():
                if idx >= self.vocab_size:
                    continue
                if self.byte_level:
                    try:
                        table[idx] = bytes(dec[c] for c in token)
                    except KeyError:  # an added special token such as <|endoftext|>
                        table[idx] = b""
                else:
                    table[idx] = self.tokenizer.decode([idx]).encode("utf-8")
            self._bytes = table
        return self._bytes

    def decode_bytes(self, ids: list[int]) -> bytes:
        if self.byte_level:
            table = self.all_token_bytes()
            return b"".join(table[i] for i in ids if 0 <= i < len(table))
        return self.tokenizer.decode(list(ids)).encode("utf-8")

    def decode(self, ids: list[int], complete_only: bool = True) -> str:
        """Text of `ids`; with `complete_only`, a trailing half of a character is left out."""
        if not self.byte_level:
            return self.tokenizer.decode(list(ids))
        data = self.decode_bytes(ids)
        if complete_only:
            data = complete_utf8_prefix(data)
        return data.decode("utf-8", errors="replace")


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _openai_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """OpenAI GPT's BPE: lower-cased, split like BERT's basic tokenizer, words end in </w>."""
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges), end_of_word_suffix="</w>", unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    return tok


def load_tokenizer_folder(folder: Path, model_type: Optional[str] = None) -> GPTTokenizer:
    folder = Path(folder)
    if model_type is None and (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        build = _openai_bpe if model_type == "openai-gpt" else _byte_level_bpe
        tok = build(folder / "vocab.json", folder / "merges.txt")
    else:
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json and merges.txt")
    if model_type != "openai-gpt":
        # GPT-2 adds no prefix space; some tokenizer.json files ask for one. Match the reference.
        pre = tok.pre_tokenizer
        if isinstance(pre, pre_tokenizers.ByteLevel):
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    eos = tok.token_to_id("<|endoftext|>")
    return GPTTokenizer(tok, byte_level=byte_level, eos_token_id=eos)


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                   offline: Optional[bool] = None) -> GPTTokenizer:
    from .weights import resolve_checkpoint

    return load_tokenizer_folder(resolve_checkpoint(name_or_path, revision, cache_dir, offline))
