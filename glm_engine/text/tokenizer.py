"""ChatGLM2 / ChatGLM3 tokenizer built directly on SentencePiece.

The checkpoint's own ``tokenization_chatglm.py`` is never imported or run:
the layout it implements is small enough to restate here.  Token ids are the
SentencePiece pieces first, then a handful of special tokens appended after
the SentencePiece vocabulary: [MASK] [gMASK] [sMASK] sop eop, then ChatGLM3's
role tokens. ``load_tokenizer`` picks a directory's tokenizer by its files: this one, or
GLM-4's byte-level BPE (text/bpe_tokenizer.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from glm_engine.text.errors import TokenizerError

if TYPE_CHECKING:
    from glm_engine.text.bpe_tokenizer import BPETokenizer

__all__ = [
    "CHATGLM2_SPECIAL_TOKENS",
    "CHATGLM3_ROLE_TOKENS",
    "TOKENIZER_FILES",
    "ALL_TOKENIZER_FILES",
    "ChatGLMTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "train_sentencepiece",
]

# Order matters: ids are assigned consecutively after the SentencePiece pieces.
CHATGLM2_SPECIAL_TOKENS: tuple[str, ...] = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# Files an engine copies from a checkpoint directory so it can tokenize on its
# own.  Deliberately no ``*.py``: code shipped with a download is never run.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# ...and, for GLM-4 checkpoints in transformers' layout, the BPE tokenizer's tokenizer.json.
ALL_TOKENIZER_FILES: tuple[str, ...] = TOKENIZER_FILES + ("tokenizer.json",)

FLAVORS: tuple[str, ...] = ("chatglm2", "chatglm3")
_MARKER = "\u2603"  # a character no piece joins with the text after it (encode_within_text)



def _detect_flavor(model_dir: Path) -> str:
    """Guess chatglm2 or chatglm3 from ``tokenizer_config.json``, if any.

    ChatGLM3 checkpoints list their role tokens in that file or name the
    model in ``name_or_path``; ChatGLM2 checkpoints do neither.
    """
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return "chatglm2"
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{config_path} is not UTF-8 text; re-copy it from the checkpoint") from None
    if "<|user|>" in text:
        return "chatglm3"
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return "chatglm2"
    if isinstance(config, dict):
        for key in ("name_or_path", "_name_or_path"):
            value = config.get(key)
            if isinstance(value, str) and "chatglm3" in value.lower():
                return "chatglm3"
    return "chatglm2"


class ChatGLMTokenizer:
    """Tokenizer of ChatGLM2-6B and ChatGLM3-6B.

    Attributes:
        flavor: ``"chatglm2"`` or ``"chatglm3"``.
        vocab_size: SentencePiece pieces plus the appended special tokens.
        pad_token_id: the SentencePiece unknown id (0), as ChatGLM2 pads with ``<unk>``.
        bos_token_id: ``<s>`` (1).
        eos_token_id: ``</s>`` (2), the end-of-text token.
        special_token_ids: name -> id of every appended special token.
        silent_ids: the ids decode() renders as nothing (special tokens, bos, eos, pad).
    """

    def __init__(self, sp_model: spm.SentencePieceProcessor, flavor: str = "chatglm2") -> None:
        """Wrap a loaded SentencePiece model; prefer :meth:`from_dir`."""
        if flavor not in FLAVORS:
            raise TokenizerError(f"unknown tokenizer flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
        self.sp_model = sp_model
        self.flavor = flavor
        self.sp_size: int = sp_model.get_piece_size()
        self.pad_token_id: int = sp_model.unk_id()
        self.bos_token_id: int = sp_model.bos_id()
        self.eos_token_id: int = sp_model.eos_id()

        names = CHATGLM2_SPECIAL_TOKENS + (CHATGLM3_ROLE_TOKENS if flavor == "chatglm3" else ())
        self.special_token_ids: dict[str, int] = {name: self.sp_size + i for i, name in enumerate(names)}
        self.vocab_size: int = self.sp_size + len(names)
        self._unknown_mark: str = sp_model.decode([sp_model.unk_id()])  # " ⁇ "

        # Ids that decode() renders as nothing, like the HF tokenizer with
        # skip_special_tokens=True (pad is the unk id there, so unk goes too).
        self.silent_ids: frozenset[int] = frozenset(self.special_token_ids.values()) | {
            self.pad_token_id,
            self.bos_token_id,
            self.eos_token_id,
        }

    @classmethod
    def from_dir(cls, path: str | Path, flavor: str | None = None) -> ChatGLMTokenizer:
        """Load ``tokenizer.model`` from a checkpoint or engine directory.

        ``flavor`` forces ``"chatglm2"`` or ``"chatglm3"``; ``None`` detects it
        from ``tokenizer_config.json``.  Raises :class:`TokenizerError` when the
        directory or model file is missing.
        """
        model_dir = Path(path)
        if not model_dir.is_dir():
            raise TokenizerError(
                f"tokenizer directory {model_dir} does not exist; pass the checkpoint directory holding tokenizer.model"
            )
        model_file = model_dir / "tokenizer.model"
        if not model_file.is_file():
            raise TokenizerError(
                f"no tokenizer.model in {model_dir}; copy it from the ChatGLM2 checkpoint into that directory"
            )
        sp_model = spm.SentencePieceProcessor()
        try:
            sp_model.load(str(model_file))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(
                f"{model_file} is not a SentencePiece model ({err}); re-copy it from the checkpoint"
            ) from err
        return cls(sp_model, flavor if flavor is not None else _detect_flavor(model_dir))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_prefix: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_prefix`` they start with ``[gMASK] sop``.

        Every ChatGLM2 prompt carries that prefix; the HF tokenizer adds it by
        default, so this does too.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError("the text holds bytes that are not UTF-8; give UTF-8 text") from None
        ids = self.sp_model.encode(text, out_type=int)
        if add_prefix:
            ids = [self.special_token_ids["[gMASK]"], self.special_token_ids["sop"], *ids]
        return ids

    def decode(self, ids: Iterable[int], hold_incomplete: bool = False, within_text: bool = False) -> str:
        """Text of ``ids`` with special tokens, bos, eos and pad (``<unk>``, 0) dropped.

        This matches ChatGLM2's HF tokenizer with ``skip_special_tokens=True``.
        An id outside ``[0, vocab_size)`` (an engine with random weights and a
        vocabulary larger than the tokenizer's), and byte pieces that do not form a
        UTF-8 character, print as SentencePiece's unknown mark ``⁇`` instead of
        raising or printing U+FFFD. With ``hold_incomplete`` (streaming), trailing
        byte pieces that begin a character not complete yet are left out, so that
        the next call prints the whole character. With ``within_text``, the ids
        print as they do after other text: SentencePiece drops the leading space of
        a text's first piece only at the start of a text.
        """
        pieces = self._pieces(ids)
        if hold_incomplete:
            pieces = pieces[:len(pieces) - self._incomplete_character(pieces)]
        if within_text:  # after the unknown mark as a text before them, cut off again
            text = self.sp_model.decode([self.sp_model.unk_id(), *pieces])[len(self._unknown_mark):]
        else:
            text = self.sp_model.decode(pieces)
        return text.replace("\ufffd", "⁇")

    def unfinished_tail(self, ids: Sequence[int]) -> int:
        """How many trailing ids ``decode(ids, hold_incomplete=True)`` leaves out: those
        from the first byte piece of an unfinished last character on, silent ids among
        them included; 0 when the last character is complete."""
        held = self._incomplete_character(self._pieces(ids))
        back = 0
        while held:
            back += 1
            held -= int(ids[-back]) not in self.silent_ids
        return back

    def _pieces(self, ids: Iterable[int]) -> list[int]:
        """The SentencePiece ids decode() renders: silent ids dropped, unknown ids as ``<unk>``."""
        pieces: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id < 0 or token_id >= self.vocab_size:
                # sp renders its unknown id as " ⁇ "; the unk id itself is
                # pad and silent, so only these ids reach it.
                pieces.append(self.sp_model.unk_id())
            elif token_id not in self.silent_ids:
                pieces.append(token_id)
        return pieces

    def _incomplete_character(self, pieces: list[int]) -> int:
        """How many trailing byte pieces begin a UTF-8 character that is not complete yet."""
        trailing: list[int] = []
        for piece in reversed(pieces[-3:]):
            if piece >= self.sp_size or not self.sp_model.is_byte(piece):
                break
            trailing.insert(0, int(self.sp_model.id_to_piece(piece)[3:5], 16))  # "<0xE5>"
        for start, lead in enumerate(trailing):
            length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 0
            if length > len(trailing) - start and all(0x80 <= byte < 0xC0 for byte in trailing[start + 1:]):
                return len(trailing) - start
        return 0

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in a text (a byte piece its byte, "▁" a space);
        special, control and unknown ids as 0xFF and their name, bytes no text holds
        (how grammar libraries tell special tokens apart)."""
        sp = self.sp_model
        names = {token_id: name for name, token_id in self.special_token_ids.items()}
        pieces = []
        for token_id in range(self.vocab_size):
            if token_id in names:
                pieces.append(b"\xff" + names[token_id].encode())
            elif sp.is_byte(token_id):
                pieces.append(bytes([int(sp.id_to_piece(token_id)[3:5], 16)]))
            elif sp.is_control(token_id) or sp.is_unknown(token_id):
                pieces.append(b"\xff" + sp.id_to_piece(token_id).encode())
            else:
                pieces.append(sp.id_to_piece(token_id).replace("\u2581", " ").encode())
        return pieces

    def max_token_chars(self) -> int:
        """Characters of the longest text piece (byte, control and unknown pieces aside): the
        most text one token stands for, before Unicode normalization."""
        sp = self.sp_model
        return max(len(sp.id_to_piece(i)) for i in range(self.sp_size)
                   if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)))

    def encode_within_text(self, text: str) -> list[int]:
        """Token ids of `text` as it is tokenized after other text: without the space
        SentencePiece puts before a text's first piece (encoded behind a marker that
        is cut off again)."""
        marker = self.sp_model.encode(_MARKER)
        ids = self.sp_model.encode(_MARKER + text)
        if ids[:len(marker)] != marker:  # the marker merged with the text: no exact cut
            ids = self.sp_model.encode(text)
            return ids[1:] if ids and self.sp_model.id_to_piece(ids[0]) == "\u2581" else ids
        return ids[len(marker):]

    @staticmethod
    def chat_prompt(query: str) -> str:
        """ChatGLM2's single-round chat prompt for ``query``."""
        return f"[Round 1]\n\n问：{query}\n\n答："


def has_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds a tokenizer load_tokenizer reads."""
    return any((Path(path) / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))


def load_tokenizer(path: str | Path) -> ChatGLMTokenizer | BPETokenizer:
    """The tokenizer of a checkpoint or engine directory, of the kind its files are:
    tokenizer.model as SentencePiece (ChatGLM2/ChatGLM3) or as a tiktoken BPE file
    (THUDM's GLM-4), else tokenizer.json (GLM-4 in transformers' layout)."""
    from glm_engine.text.bpe_tokenizer import BPETokenizer, is_tiktoken_file

    directory = Path(path)
    model_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if model_file.is_file() and is_tiktoken_file(model_file):
        return BPETokenizer.from_tiktoken_file(model_file, directory)
    if not model_file.is_file() and json_file.is_file():
        return BPETokenizer.from_tokenizer_json(json_file)
    return ChatGLMTokenizer.from_dir(directory)


def train_sentencepiece(
    texts: list[str],
    output_dir: str | Path,
    vocab_size: int = 1000,
    flavor: str = "chatglm2",
    character_coverage: float = 1.0,
) -> Path:
    """Train a tiny BPE SentencePiece model laid out like ChatGLM2's; return ``output_dir``.

    Writes ``output_dir/tokenizer.model`` (and, for ``flavor="chatglm3"``, a
    ``tokenizer_config.json`` naming ``chatglm3-tiny`` so detection works).
    Byte fallback makes every text encodable, Chinese included.  Pieces are
    ``<unk>``=0, ``<s>``=1, ``</s>``=2 with no pad piece; ``vocab_size`` counts
    SentencePiece pieces only (the special tokens come on top) and is an upper
    bound when the texts are too few to fill it. ``character_coverage`` below 1
    leaves the rarest characters to byte fallback (small vocabularies).  Training is single-threaded,
    unshuffled and seeded, so the same inputs give byte-identical files; it
    sets SentencePiece's process-wide random seed.
    """
    if flavor not in FLAVORS:
        raise TokenizerError(f"unknown tokenizer flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # One line per sentence: the trainer silently skips over-long sentences,
    # and news articles are paragraphs joined by newlines.
    sentences = [line for text in texts for line in text.splitlines() if line.strip()]
    if not sentences:
        raise TokenizerError("train_sentencepiece needs at least one non-empty text")

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # A small corpus may not yield vocab_size pieces; take what it gives.
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Identity normalization keeps decode(encode(text)) == text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    if flavor == "chatglm3":
        config = {"name_or_path": "chatglm3-tiny", "tokenizer_class": "ChatGLMTokenizer"}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
