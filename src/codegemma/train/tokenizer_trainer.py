"""Train a Gemma-layout tokenizer: byte-fallback BPE with Gemma's special tokens at Gemma's ids.

Layout of the vocabulary (what `codegemma.tokenizer.Tokenizer` and real CodeGemma agree on):
pad 0, eos 1, bos 2, unk 3, `<mask>` 4, `[multimodal]` 5, `<unused0>`.. up to the FIM tokens at
67-70, more `<unusedN>` up to `<start_of_turn>` 106 / `<end_of_turn>` 107, the 256 byte tokens
`<0x00>`..`<0xFF>` at 108-363, then learned BPE tokens up to `vocab_size` (padded with further
`<unusedN>` if the corpus is too small to learn that many).

Key choice: the written `tokenizer.json` mirrors Gemma's (normalizer " " -> "▁", no
pre-tokenizer, BPE with byte fallback, decoder ▁ -> " " + ByteFallback + Fuse, a post-processor
adding `<bos>`), so there is no dummy prefix and transformers' `AutoTokenizer` loads it as a Gemma
tokenizer. Only *training* splits the text (words, digits, punctuation, whitespace runs) so merges
stay meaningful; the learned merges then apply to unsplit text exactly as Gemma's do.

    codegemma tokenizer train src/ --vocab-size 512 --out my_tok/
    python -c "from codegemma.train.tokenizer_trainer import train_tokenizer; ..."
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from codegemma.errors import TokenizerTrainingError
from codegemma.fileio import write_bytes_atomic, write_text_atomic
from codegemma.tokenizer import SPECIAL_STRINGS

# -- Gemma's reserved ids ------------------------------------------------------------------
_FIM = ("fim_prefix", "fim_middle", "fim_suffix", "file_separator")
RESERVED_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    *(f"<unused{i}>" for i in range(61)),  # ids 6..66
    *(SPECIAL_STRINGS[k] for k in _FIM),  # ids 67..70
    *(f"<unused{i}>" for i in range(61, 96)),  # ids 71..105
    SPECIAL_STRINGS["start_of_turn"],
    SPECIAL_STRINGS["end_of_turn"],  # ids 106, 107
)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
FIRST_LEARNED_ID = len(RESERVED_TOKENS) + len(BYTE_TOKENS)  # 364

# Training-time split (applied after " " -> "▁"): whole runs of 2+ spaces (indentation: at
# inference the low-rank "▁▁" merges swallow a run whole, so "▁▁▁▁def" is "▁▁▁▁" + "def"), words
# with one leading ▁, single digits (as Gemma), punctuation runs with trailing newlines, newlines.
_TRAIN_SPLIT = r"▁{2,}|▁?[^▁\s\p{L}\p{N}]+[\r\n]*|▁?\p{L}+|\p{N}|[\r\n]+|▁|\s+"

# The official Gemma / CodeGemma-7B-IT chat template (system role rejected, assistant -> model).
# Every tokenizer written here carries it (transformers builds chat prompts from it); a model
# checkpoint keeps it only from an SFT run, as it marks a chat model (train/run_checkpoint.py).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

CODE_EXTENSIONS = frozenset(
    (
        ".py",
        ".pyi",
        ".ipynb",
        ".js",
        ".jsx",
        ".ts",
        ".tsx",
        ".java",
        ".kt",
        ".kts",
        ".scala",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".cxx",
        ".hpp",
        ".hh",
        ".cs",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".swift",
        ".m",
        ".mm",
        ".lua",
        ".pl",
        ".r",
        ".jl",
        ".hs",
        ".ml",
        ".ex",
        ".exs",
        ".erl",
        ".clj",
        ".dart",
        ".sh",
        ".bash",
        ".zsh",
        ".sql",
        ".html",
        ".htm",
        ".css",
        ".scss",
        ".md",
        ".rst",
        ".txt",
        ".json",
        ".toml",
        ".yaml",
        ".yml",
        ".xml",
        ".cfg",
        ".ini",
    )
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a byte-fallback BPE on `texts`; write tokenizer.json + HF configs into `out_dir`."""
    _check_vocab_size(vocab_size)
    vocab, merges = _learn_bpe(texts, vocab_size - FIRST_LEARNED_ID)
    tokenizer = _assemble(vocab, merges, vocab_size)
    out = Path(out_dir)
    write_text_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    _write_hf_configs(out)
    return out


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size <= FIRST_LEARNED_ID:
        raise TokenizerTrainingError(
            f"vocab_size={vocab_size!r} is too small: Gemma's layout reserves {len(RESERVED_TOKENS)} "
            f"special ids and {len(BYTE_TOKENS)} byte tokens, so use vocab_size > {FIRST_LEARNED_ID} "
            "(e.g. 512 for tests, 32000 or more for a real model)"
        )


def _learn_bpe(texts: Iterable[str], budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learned tokens (alphabet then merges, in id order) and merges, at most `budget` tokens."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if iter(texts) is texts:  # a one-shot iterator: keep it, the alphabet needs a first pass
        texts = list(texts)
    alphabet = _alphabet(texts, limit=max(1, min(budget // 2, 1000)))
    tk = HFTokenizer(BPE(byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(_TRAIN_SPLIT), behavior="isolated")
    # The library breaks frequency ties of limit_alphabet in hash order (not reproducible), so the
    # alphabet is chosen above and pinned: initial_alphabet chars are never dropped.
    trainer = BpeTrainer(
        vocab_size=budget,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tk.train_from_iterator((t for t in texts if t), trainer)
    model = json.loads(tk.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [tok for tok, i in by_id if i < budget]
    kept = set(tokens)
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append((a, b))
    return tokens, merges


def _alphabet(texts: Iterable[str], *, limit: int) -> list[str]:
    """The `limit` most frequent characters (after " " -> "▁"), ties broken by code point."""
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerTrainingError(f"training texts must be str, got {type(text).__name__}")
        counts.update(text)
    if not counts:
        raise TokenizerTrainingError("no training text: pass at least one non-empty text")
    if " " in counts:
        counts["▁"] += counts.pop(" ")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(ch for ch, _ in ranked[:limit])


def _assemble(learned: list[str], merges: list[tuple[str, str]], vocab_size: int):
    """The final tokenizers.Tokenizer with Gemma's layout and pipeline."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    for tok in (*RESERVED_TOKENS, *BYTE_TOKENS, *learned):
        vocab.setdefault(tok, len(vocab))  # a learned token can't collide, but never renumber
    filler = [f"<unused{i}>" for i in range(96, 96 + vocab_size - len(vocab))]
    for tok in filler:
        vocab[tok] = len(vocab)
    bpe = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tk = HFTokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*RESERVED_TOKENS, *filler)]
    )
    return tk


def _write_hf_configs(out: Path) -> None:
    names = {f"{k}_token": SPECIAL_STRINGS[k] for k in ("bos", "eos", "pad", "unk")}
    config = {
        "tokenizer_class": "GemmaTokenizerFast",
        **names,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "chat_template": GEMMA_CHAT_TEMPLATE,
    }
    special_map = {**names, "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text_atomic(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


# -- sentencepiece (tokenizer.model) -------------------------------------------------------
def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a sentencepiece BPE `tokenizer.model` with Gemma's ids, byte fallback, no dummy prefix.

    Texts longer than 1 MiB are skipped by sentencepiece (`max_sentence_length`).
    """
    import sentencepiece as spm

    _check_vocab_size(vocab_size)
    docs = [t for t in texts if isinstance(t, str) and t]
    if not docs:
        raise TokenizerTrainingError("no training text: pass at least one non-empty text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(RESERVED_TOKENS[4:]),
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentence_length=1 << 20,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out = Path(out_dir)
    write_bytes_atomic(out / "tokenizer.model", model.getvalue())
    return out


# -- corpus reading and CLI ----------------------------------------------------------------
class CorpusReader:
    """Yields the text of files (named, or found recursively in directories), counting skips.

    Iterating again re-reads the files, so a large corpus is never held in memory.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], extensions=CODE_EXTENSIONS) -> None:
        self.paths = [Path(p) for p in paths]
        self.extensions = extensions
        self.read = 0
        self.skipped: list[Path] = []
        missing = [str(p) for p in self.paths if not p.exists()]
        if missing:
            raise TokenizerTrainingError(f"corpus path(s) not found: {', '.join(missing)}")

    def files(self) -> Iterator[Path]:
        for path in self.paths:
            if path.is_file():
                yield path  # named explicitly: read whatever its extension
                continue
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if Path(name).suffix.lower() in self.extensions:
                        yield Path(root) / name

    def __iter__(self) -> Iterator[str]:
        self.read, self.skipped = 0, []  # re-iterable: training reads the corpus twice
        for file in self.files():
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                self.skipped.append(file)
                continue
            self.read += 1
            yield text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `codegemma tokenizer train CORPUS... --vocab-size N --out DIR`."""
    parser = subparsers.add_parser("tokenizer", help="train Gemma-layout tokenizers")
    sub = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = sub.add_parser(
        "train",
        help="train a byte-fallback BPE with Gemma's special ids",
        description="Files are read as UTF-8; directories are searched recursively for code and "
        "text files (hidden directories skipped); undecodable files are skipped.",
    )
    train.add_argument("corpus", nargs="+", metavar="CORPUS", help="files or directories")
    train.add_argument("--vocab-size", type=int, required=True, help=f"> {FIRST_LEARNED_ID}")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument(
        "--kind",
        choices=("json", "sentencepiece"),
        default="json",
        help="tokenizer.json (default, loads in transformers) or a sentencepiece tokenizer.model",
    )
    train.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        reader = CorpusReader(args.corpus)
        trainer = train_tokenizer if args.kind == "json" else train_sentencepiece
        out = trainer(reader, args.vocab_size, args.out)
    except TokenizerTrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"trained on {reader.read} file(s), skipped {len(reader.skipped)} undecodable; wrote {out}"
    )
    return 0
