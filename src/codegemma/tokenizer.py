"""One `Tokenizer` over Gemma's `tokenizer.json` (HF `tokenizers`) or `tokenizer.model` (sentencepiece).

Key design choices:
- Text is always plain text. Special tokens (bos/eos/pad/unk, the FIM sentinels, the turn markers,
  reserved `<unusedN>` slots and every token the file marks special/control) are found in the
  vocabulary by their strings; wherever such a string occurs in user text it is cut out and encoded
  as UTF-8 byte tokens (`<0xNN>`), so typed text can never produce a special id, whichever file
  kind is loaded (CodeGemma's `tokenizer.json` marks its FIM tokens `special: false`, and
  sentencepiece matches user-defined symbols in raw text, so neither library's own switch suffices).
  A literal "▁" (U+2581, Gemma's space marker) is byte-encoded the same way, so round trips are
  exact where Gemma's own tokenizer would turn it into a space.
- BOS is explicit: `encode(text, bos=True)` prepends exactly one; the file's post-processor is
  never run.
- Decoding is done here, from a per-id byte table (pieces with "▁" -> " ", byte tokens -> raw
  bytes), for both file kinds alike. `decode` and the streaming decoder share that table and the
  same UTF-8 decoder, so concatenated `push()` outputs plus `flush()` equal `decode(all ids)` and a
  multi-byte character split over byte-fallback tokens is only emitted once complete.

    tok = Tokenizer.load("path/to/model_dir")
    ids = tok.encode("def f():", bos=True)
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from codegemma.errors import TokenizerError

# Gemma's token strings. The FIM and turn tokens are the same in every CodeGemma checkpoint.
SPECIAL_STRINGS: dict[str, str] = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "fim_prefix": "<|fim_prefix|>",
    "fim_middle": "<|fim_middle|>",
    "fim_suffix": "<|fim_suffix|>",
    "file_separator": "<|file_separator|>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
}
REQUIRED = ("pad", "eos", "bos", "fim_prefix", "fim_middle", "fim_suffix", "file_separator")
# Reserved slots that Gemma's files carry as plain user-defined symbols; treat them as special too.
RESERVED_RE = re.compile(r"<unused\d+>|<mask>|\[multimodal\]|\[@BOS@\]")


@dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Ids of the tokens prompts are built from (Gemma: 0, 1, 2, 3, 67, 68, 69, 70, 106, 107).

    `unk`, `start_of_turn` and `end_of_turn` are None when the vocabulary lacks them (a tokenizer
    without turn tokens cannot build chat prompts; everything else works).
    """

    pad: int
    eos: int
    bos: int
    unk: int | None
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    file_separator: int
    start_of_turn: int | None
    end_of_turn: int | None


class TextCodec(Protocol):
    """What inference needs of a tokenizer (the engine, stop strings, prompts, the server):
    `Tokenizer` is one; a test or another backend may bring its own."""

    special: SpecialTokens

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str: ...

    def stream_decoder(self, *, skip_special: bool = False) -> IncrementalDecoder: ...


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only text whose UTF-8 bytes are complete."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok._token_bytes(token_id, self._skip), final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD, as in `decode`)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class _HFBackend:
    """tokenizer.json through the `tokenizers` library, post-processor and added-token matching off."""

    def __init__(self, data: bytes) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises bare Exceptions for malformed files
            raise TokenizerError(f"tokenizer.json could not be parsed: {e}") from e
        self.tk.encode_special_tokens = True  # second line of defence; we also split ourselves
        self.size = self.tk.get_vocab_size(with_added_tokens=True)
        added = self.tk.get_added_tokens_decoder()
        self.marked_special = {i for i, t in added.items() if t.special}

    def pieces(self) -> list[str | None]:
        """Every id's piece (None for a hole in the vocabulary), built on each call."""
        pieces: list[str | None] = [None] * self.size
        for piece, i in self.tk.get_vocab(with_added_tokens=True).items():
            pieces[i] = piece
        return pieces

    def piece(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it), so a server's other
        # threads and its event loop keep running while a long prompt is tokenized
        return self.tk.encode_batch([text], add_special_tokens=False)[0].ids

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)


class _SPBackend:
    """tokenizer.model through sentencepiece; its control and unknown pieces count as special."""

    def __init__(self, data: bytes) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(f"tokenizer.model could not be parsed: {e}") from e
        self.size = self.sp.get_piece_size()
        self.marked_special = {
            i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }

    def pieces(self) -> list[str | None]:
        """Every id's piece, built on each call (a 256k vocabulary's list is 16 MB: it is not
        kept)."""
        return self.sp.id_to_piece(list(range(self.size)))

    def piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # sentencepiece answers unk_id for unknown pieces; only trust an exact round trip
        return i if self.sp.id_to_piece(i) == piece else None


class Tokenizer:
    """Gemma tokenizer with special tokens by name, safe plain-text encoding and streaming decode."""

    def __init__(
        self,
        backend: _HFBackend | _SPBackend,
        *,
        path: Path,
        data: bytes,
        names: dict[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.path = path
        self.kind = "tokenizer.json" if isinstance(backend, _HFBackend) else "tokenizer.model"
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.special = self._find_special(names or SPECIAL_STRINGS)
        self._byte_ids = self._find_byte_ids()
        pieces = self._backend.pieces()
        self._table = self._build_byte_table(pieces)
        self.special_ids = self._find_special_ids(pieces)
        # A literal "▁" would come back as a space (the pipeline writes spaces as "▁"), so it is
        # byte-encoded too, like special-token strings: decode(encode(text)) == text always.
        protected = {self.id_to_token(i) for i in self.special_ids} | {"▁"}
        ordered = sorted((p for p in protected if p), key=len, reverse=True)
        self._protected_re = re.compile("|".join(re.escape(p) for p in ordered))

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory (tokenizer.json preferred over tokenizer.model) or one of those files."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.model"]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise TokenizerError(
                    f"{path} has neither tokenizer.json nor tokenizer.model; pass a model directory "
                    "that contains one (or train one: `codegemma tokenizer train`)"
                )
            file, names = found, _names_from_config(path)
        elif path.is_file():
            file, names = path, _names_from_config(path.parent)
        else:
            raise TokenizerError(f"tokenizer path {path} does not exist")
        data = file.read_bytes()
        is_json = file.suffix == ".json" or data.lstrip()[:1] == b"{"
        backend = _HFBackend(data) if is_json else _SPBackend(data)
        return cls(backend, path=file, data=data, names=names)

    @classmethod
    def from_sentencepiece(
        cls, data: bytes, *, path: str | os.PathLike, names: dict[str, str] | None = None
    ) -> Tokenizer:
        """A tokenizer from a serialized sentencepiece ModelProto (e.g. one rebuilt from a GGUF
        file's vocabulary); `path` names its origin in messages, `names` overrides the special
        token strings (default Gemma's)."""
        return cls(_SPBackend(data), path=Path(path), data=data, names=names)

    def _find_special(self, names: dict[str, str]) -> SpecialTokens:
        ids = {key: self._backend.piece_to_id(tok) for key, tok in names.items()}
        missing = [f"{key} {names[key]!r}" for key in REQUIRED if ids[key] is None]
        if missing:
            raise TokenizerError(
                f"{self.path}: required special token(s) missing from the vocabulary: "
                f"{', '.join(missing)}. codegemma needs a CodeGemma tokenizer (or one trained with "
                "`codegemma tokenizer train`, which reserves them at Gemma's ids)"
            )
        return SpecialTokens(**ids)

    def _find_byte_ids(self) -> list[int]:
        ids = [self._backend.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        if any(i is None for i in ids):
            raise TokenizerError(
                f"{self.path}: the byte-fallback tokens <0x00>..<0xFF> are missing; codegemma "
                "needs a byte-fallback tokenizer like Gemma's"
            )
        return ids  # type: ignore[return-value]

    def _find_special_ids(self, pieces: list[str | None]) -> frozenset[int]:
        named = {v for v in vars(self.special).values() if v is not None}
        reserved = {i for i, p in enumerate(pieces) if p and RESERVED_RE.fullmatch(p)}
        return frozenset(named | reserved | self._backend.marked_special)

    def _build_byte_table(self, pieces: list[str | None]) -> list[bytes]:
        byte_of = {i: b for b, i in enumerate(self._byte_ids)}
        table = [(p or "").replace("▁", " ").encode("utf-8") for p in pieces]
        for i, b in byte_of.items():
            table[i] = bytes([b])
        return table

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.size

    @property
    def bos_id(self) -> int:
        return self.special.bos

    @property
    def eos_id(self) -> int:
        return self.special.eos

    @property
    def pad_id(self) -> int:
        return self.special.pad

    @property
    def unk_id(self) -> int | None:
        return self.special.unk

    def token_to_id(self, tok: str) -> int | None:
        return self._backend.piece_to_id(tok)

    def id_to_token(self, i: int) -> str:
        piece = self._backend.piece(i) if 0 <= i < self.vocab_size else None
        if piece is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return piece

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Plain text -> ids. Special-token strings inside `text` become byte tokens, never specials."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        ids = [self.special.bos] if bos else []
        pos = 0
        for m in self._protected_re.finditer(text):
            if m.start() > pos:
                ids += self._backend.encode(text[pos : m.start()])
            ids += [self._byte_ids[b] for b in m.group().encode("utf-8")]
            pos = m.end()
        if pos < len(text):
            ids += self._backend.encode(text[pos:])
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        data = b"".join(self._token_bytes(i, skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)

    def _token_bytes(self, i: int, skip_special: bool) -> bytes:
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if skip_special and i in self.special_ids:
            return b""
        return self._table[i]

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, path={str(self.path)!r})"


def _names_from_config(directory: Path) -> dict[str, str]:
    """Gemma's strings, overridden by bos/eos/pad/unk names in tokenizer_config.json if present."""
    names = dict(SPECIAL_STRINGS)
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = directory / fname
        if not cfg.is_file():
            continue
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg} is not valid JSON: {e}") from e
        for key in ("pad", "eos", "bos", "unk"):
            value = data.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                names[key] = value
    return names
