"""GLM-4's tokenizers: byte-level BPE, read from THUDM's tiktoken file (tokenizer.model,
one "base64-token rank" line per token, with the special tokens after the ranks) by the
tiktoken package, or from transformers' tokenizer.json by the tokenizers library. The
libraries encode; decoding joins each id's bytes here. No code from the checkpoint runs:
THUDM's tokenization_chatglm.py is restated (its split pattern, its special tokens).

As the Hugging Face tokenizers of GLM-4 do, a special token's text inside a text
(e.g. "<|user|>") encodes as that special token."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from glm_engine.text.errors import TokenizerError

# THUDM GLM-4's special tokens, in id order after the BPE ranks.
GLM4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")
# THUDM GLM-4's pre-tokenizer split (tokenization_chatglm.py's pat_str).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
UNKNOWN_MARK = "⁇"  # what an id outside the vocabulary, or a byte that is no character, prints as


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character a byte starts (0 for a continuation or invalid byte)."""
    return 1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else \
        4 if 0xF0 <= lead < 0xF8 else 0


def incomplete_tail(data: bytes) -> int:
    """How many trailing bytes begin a UTF-8 character that is not complete yet."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte < 0xC0:
            continue
        return back if _utf8_length(byte) > back else 0
    return 0


class BPETokenizer:
    """A byte-level BPE tokenizer with GLM-4's special tokens; offers what ChatGLMTokenizer
    offers to the engine's tools (encode, decode, token_bytes, special and silent ids).

    Attributes:
        flavor: ``"glm4"`` (its chat format: text/prompts.py).
        vocab_size: one more than the largest id.
        eos_token_id, pad_token_id: ``<|endoftext|>``; bos_token_id: None (GLM-4 has none).
        special_token_ids: name -> id of every special token.
        silent_ids: the ids decode() renders as nothing (every special token).
    """

    flavor = "glm4"

    def __init__(self, pieces: dict[int, bytes], special_token_ids: dict[str, int],
                 encode_text: Callable[[str], list[int]]) -> None:
        """`pieces`: the bytes of each ordinary id; `encode_text`: the library's encoding
        of a text (special tokens in it matched); prefer the from_* loaders."""
        if "<|endoftext|>" not in special_token_ids or "[gMASK]" not in special_token_ids:
            raise TokenizerError("the tokenizer lacks GLM-4's <|endoftext|> or [gMASK] special token; give "
                                 "a GLM-4 tokenizer")
        self._pieces = pieces
        self._encode_text = encode_text
        self.special_token_ids = dict(special_token_ids)
        self.vocab_size: int = max([*pieces, *special_token_ids.values()]) + 1
        self.eos_token_id: int = special_token_ids["<|endoftext|>"]
        self.pad_token_id: int = self.eos_token_id
        self.bos_token_id: int | None = None
        self.silent_ids: frozenset[int] = frozenset(special_token_ids.values())

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, config_dir: str | Path | None = None) -> BPETokenizer:
        """THUDM GLM-4's tokenizer.model read with tiktoken; the special tokens are
        tokenizer_config.json's added_tokens_decoder (in `config_dir`), else GLM-4's list
        after the ranks."""
        import tiktoken

        ranks = read_tiktoken_ranks(Path(path))
        specials = _configured_specials(Path(config_dir) if config_dir else Path(path).parent)
        specials = specials or {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
        try:
            encoding = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                                         special_tokens=specials)
        except ValueError as error:
            raise TokenizerError(f"{path}: the tokens do not make a tiktoken encoding ({error})") from None
        pieces = {rank: token for token, rank in ranks.items()}
        return cls(pieces, specials, _TiktokenEncode(encoding))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> BPETokenizer:
        """transformers' tokenizer.json of a byte-level BPE model, read with the tokenizers library."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the library's parse errors have no common type
            raise TokenizerError(f"{path} is not a tokenizer.json ({str(error)[:200]}); re-copy it") from None
        specials = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
                    if token.special}
        byte_of = {char: byte for byte, char in byte_characters().items()}
        pieces = {}
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            if any(char not in byte_of for char in token):
                raise TokenizerError(f"{path}: token {token[:20]!r} is not byte-level BPE; only byte-level "
                                     "tokenizers (GLM-4's) are read from tokenizer.json")
            pieces[token_id] = bytes(byte_of[char] for char in token)
        for token_id, token in tokenizer.get_added_tokens_decoder().items():
            if not token.special:  # an added token that prints as its text
                pieces[token_id] = token.content.encode()
        return cls(pieces, specials, _TokenizersEncode(tokenizer))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_prefix: bool = True) -> list[int]:
        """Token ids of `text`; with `add_prefix` they start with ``[gMASK] <sop>`` as every
        GLM-4 prompt does."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError("the text holds bytes that are not UTF-8; give UTF-8 text") from None
        prefix = [self.special_token_ids["[gMASK]"], self.special_token_ids["<sop>"]] if add_prefix else []
        return prefix + list(self._encode_text(text))

    def encode_within_text(self, text: str) -> list[int]:
        """Token ids of `text` after other text: byte-level BPE adds no leading space, so its own."""
        return self.encode(text, add_prefix=False)

    def decode(self, ids: Iterable[int], hold_incomplete: bool = False, within_text: bool = False) -> str:
        """Text of `ids` with the special tokens dropped (skip_special_tokens=True). An id
        outside the vocabulary and a byte that makes no character print as ``⁇``; with
        `hold_incomplete` (streaming) the ids of an unfinished last character are left
        out. `within_text` changes nothing (no leading space to drop)."""
        ids = [int(token_id) for token_id in ids]
        if hold_incomplete:
            ids = ids[:len(ids) - self.unfinished_tail(ids)]
        return self._bytes(ids).decode("utf-8", errors="replace").replace("\ufffd", UNKNOWN_MARK)

    def unfinished_tail(self, ids: Sequence[int]) -> int:
        """How many trailing ids ``decode(ids, hold_incomplete=True)`` leaves out: those from
        the one holding an unfinished last character's first byte on (silent ids among them)."""
        held = incomplete_tail(self._bytes(ids))
        back = 0
        while held > 0:
            back += 1
            held -= len(self._bytes([ids[-back]]))
        return back

    def _bytes(self, ids: Iterable[int]) -> bytes:
        unknown = UNKNOWN_MARK.encode()
        return b"".join(self._pieces.get(int(token_id), b"" if int(token_id) in self.silent_ids else unknown)
                        for token_id in ids)

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in a text; special and unused ids as 0xFF and a
        name, bytes no text holds (how grammar libraries tell special tokens apart)."""
        names = {token_id: name for name, token_id in self.special_token_ids.items()}
        return [self._pieces[token_id] if token_id in self._pieces
                else b"\xff" + names.get(token_id, f"<unused_{token_id}>").encode()
                for token_id in range(self.vocab_size)]

    def max_token_chars(self) -> int:
        """Characters of the longest text one token stands for (a byte of a character counts one)."""
        return max(len(piece.decode("utf-8", errors="replace")) for piece in self._pieces.values())

    def chat_prompt(self, query: str) -> str:
        """GLM-4's single-round chat prompt for `query`, as text (its special tokens encode as such)."""
        return f"[gMASK]<sop><|user|>\n{query}<|assistant|>"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one "base64-token rank" line per token."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} is not a tiktoken BPE file ({error}); re-copy it from the checkpoint") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError, IndexError):
            raise TokenizerError(f"{path} line {number} is not 'base64-token rank'; re-copy the file") from None
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path} holds no token; re-copy it from the checkpoint")
    return ranks


def is_tiktoken_file(path: Path) -> bool:
    """Whether a tokenizer.model is a tiktoken BPE file (text lines) rather than a SentencePiece model."""
    with open(path, "rb") as stream:
        head = stream.read(256).split(b"\n", 1)[0].split()
    return len(head) == 2 and head[1].isdigit() and all(
        byte in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for byte in head[0])


def _configured_specials(directory: Path) -> dict[str, int]:
    """name -> id of the special tokens tokenizer_config.json's added_tokens_decoder lists ({} without one)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        return {entry["content"]: int(token_id) for token_id, entry in added.items()}
    except (ValueError, RecursionError, AttributeError, KeyError, TypeError):
        raise TokenizerError(f"{path}: added_tokens_decoder is not a map of ids to tokens; re-copy it") from None


def byte_characters() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return characters


class _TiktokenEncode:
    """Text -> ids with a tiktoken encoding, special tokens read as such (a class, not a
    lambda: the tokenizer is pickled into serve.py's engine process)."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding

    def __call__(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")


class _TokenizersEncode:
    """Text -> ids with a `tokenizers` Tokenizer, no special tokens added (picklable)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids
