"""Token layouts, the one place that defines them: FIM (PSM/SPM), multi-file context, chat.

Training data (data/fim.py) and inference (completion.py) both build their sequences here, so a
model sees at inference exactly the layout it was trained on. Everything is assembled at the token
level: sentinel ids come from `tok.special`, text goes through `tok.encode`, which never yields a
special id, so nothing a user types (a literal "<|fim_middle|>" included) can inject a sentinel.

Layouts (CodeGemma report, FIM paper's SPM variant used jointly with PSM):
    PSM   <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M
    SPM   <|fim_prefix|><|fim_suffix|>S<|fim_middle|>P M
    files path\\n text <|file_separator|> path\\n text ...
    chat  <bos><start_of_turn>user\\n{msg}<end_of_turn>\\n<start_of_turn>model\\n

    from codegemma.prompts import fim_prompt
    ids = fim_prompt(tok, "def add(a, b):\\n    return ", "\\n", path="math.py")

`fim_ids` assembles the same layout from parts already encoded; `fit_infill_prompt` fits it into a
token budget as llama.cpp's server fits an /infill request (the server's /infill does this).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from codegemma.errors import PromptError
from codegemma.tokenizer import SPECIAL_STRINGS, Tokenizer

CHAT_ROLES = {"user": "user", "model": "model", "assistant": "model"}


class FimMode(StrEnum):
    PSM = "psm"
    SPM = "spm"


@dataclass(frozen=True, kw_only=True)
class ContextFile:
    """Another file of the repository, shown to the model before the file being completed."""

    path: str
    text: str


def _mode(mode: FimMode | str) -> FimMode:
    try:
        return FimMode(mode)
    except ValueError:
        raise PromptError(f"unknown FIM mode {mode!r}; use 'psm' or 'spm'") from None


# -- fill-in-the-middle --------------------------------------------------------------------
def fim_prompt(
    tok: Tokenizer,
    prefix: str,
    suffix: str,
    *,
    mode: FimMode | str = FimMode.PSM,
    path: str | None = None,
    files: Sequence[ContextFile] = (),
    bos: bool = True,
) -> list[int]:
    """Inference prompt whose continuation is the middle; prefix and suffix may be empty.

    [bos] + (path\\n text <|file_separator|>) per context file + (path\\n if path) + then
    PSM: <pre>P<suf>S<mid>   SPM: <pre><suf>S<mid>P
    """
    return fim_ids(
        tok,
        tok.encode(prefix),
        tok.encode(suffix),
        mode=mode,
        files=[context_file_ids(tok, f) for f in files],
        path_ids=tok.encode(path + "\n") if path else [],
        bos=bos,
    )


def fim_ids(
    tok: Tokenizer,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    mode: FimMode | str = FimMode.PSM,
    files: Sequence[Sequence[int]] = (),
    path_ids: Sequence[int] = (),
    bos: bool = True,
) -> list[int]:
    """`fim_prompt`'s layout from parts already encoded: `files` are context files as
    `context_file_ids` gives them (each is followed by <|file_separator|>)."""
    sp = tok.special
    ids = [sp.bos] if bos else []
    for f in files:
        ids += [*f, sp.file_separator]
    ids += path_ids
    if _mode(mode) is FimMode.PSM:
        return ids + [sp.fim_prefix, *prefix_ids, sp.fim_suffix, *suffix_ids, sp.fim_middle]
    return ids + [sp.fim_prefix, sp.fim_suffix, *suffix_ids, sp.fim_middle, *prefix_ids]


def context_file_ids(tok: Tokenizer, f: ContextFile) -> list[int]:
    """A context file as it precedes the FIM prompt: `path\n` then its text (no separator)."""
    if not isinstance(f, ContextFile):
        raise PromptError(f"files must be ContextFile(path=..., text=...), got {f!r}")
    return file_tokens(tok, f.path, tok.encode(f.text))


FIM_OVERHEAD = 4  # bos and the three FIM sentinels


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    truncated: bool  # some of the prefix, the suffix or the context files did not fit
    files_kept: int  # how many of the context files (the last ones) are in the prompt


def fit_infill_prompt(
    tok: Tokenizer,
    prefix: str,
    suffix: str,
    files: Sequence[ContextFile] = (),
    *,
    mode: FimMode | str = FimMode.PSM,
    budget: int,
    files_budget: int | None = None,
) -> FittedPrompt:
    """`fim_prompt`'s layout fitted into `budget` tokens the way llama.cpp's server fits an
    /infill request (its `format_prompt_infill`): the context files ("extra context") keep the
    most recent (last) ones that fit whole, each with its separator, in at most `files_budget`
    tokens (default: half the budget); the prefix keeps its end and the suffix its start, sharing
    the rest 3:1 (a side that needs less leaves the rest to the other). A `files_budget` that
    does not depend on the request makes requests with the same files begin with the same
    tokens, whatever their prefix, suffix and length: a cache warm-up's prefill is then reused
    (llama.cpp reserves its batch size for the prefix and suffix instead, and relies on KV
    shifting to reuse the files)."""
    room = budget - FIM_OVERHEAD
    if room < 0:
        raise PromptError(
            f"a FIM prompt needs at least {FIM_OVERHEAD} tokens but only {budget} fit; "
            "lower the number of tokens to generate"
        )
    left = min(room, budget // 2 if files_budget is None else files_budget)
    kept: list[list[int]] = []
    for f in reversed(files):
        ids = context_file_ids(tok, f)
        if len(ids) + 1 > left:
            break
        kept.insert(0, ids)
        left -= len(ids) + 1
    room -= sum(len(ids) + 1 for ids in kept)
    pre, suf = tok.encode(prefix), tok.encode(suffix)
    n_suf = min(len(suf), max(room // 4, room - len(pre)))
    n_pre = min(len(pre), room - n_suf)
    ids = fim_ids(tok, pre[len(pre) - n_pre :], suf[:n_suf], mode=mode, files=kept)
    truncated = n_pre < len(pre) or n_suf < len(suf) or len(kept) < len(files)
    return FittedPrompt(ids=ids, truncated=truncated, files_kept=len(kept))


def fim_example(
    tok: Tokenizer, prefix: str, middle: str, suffix: str, *, mode: FimMode | str
) -> list[int]:
    """Training layout of one file's FIM'd text (no bos, no path header).

    Prefix and middle are encoded separately, as at inference the prompt ends with the prefix's
    tokens and the model writes the middle's.
    """
    sp = tok.special
    pre, mid, suf = tok.encode(prefix), tok.encode(middle), tok.encode(suffix)
    if _mode(mode) is FimMode.PSM:
        return [sp.fim_prefix, *pre, sp.fim_suffix, *suf, sp.fim_middle, *mid]
    return [sp.fim_prefix, sp.fim_suffix, *suf, sp.fim_middle, *pre, *mid]


def file_tokens(tok: Tokenizer, path: str, body_ids: list[int]) -> list[int]:
    """A file as the model sees it in a multi-file sample: `path\\n` then its body."""
    return tok.encode(path + "\n") + list(body_ids)


def join_files(tok: Tokenizer, files_ids: Sequence[list[int]]) -> list[int]:
    """Files of one repository sample, separated by <|file_separator|>."""
    out: list[int] = []
    for i, ids in enumerate(files_ids):
        if i:
            out.append(tok.special.file_separator)
        out += ids
    return out


FIM_SENTINELS = tuple(
    SPECIAL_STRINGS[k] for k in ("fim_prefix", "fim_suffix", "fim_middle", "file_separator")
)
_PRE, _SUF, _MID = (
    re.escape(SPECIAL_STRINGS[k]) for k in ("fim_prefix", "fim_suffix", "fim_middle")
)
_FIM_TEXT = re.compile(
    rf"\A(?:{re.escape(SPECIAL_STRINGS['bos'])})?{_PRE}(?P<prefix>.*){_SUF}(?P<suffix>.*){_MID}\Z",
    re.DOTALL,
)


def parse_fim_text(text: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt written as text in the PSM layout
    (`[<bos>]<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`, what Continue sends for a model named
    codegemma), else None; a sentinel inside P or S makes it no such prompt."""
    m = _FIM_TEXT.match(text)
    if m is None or any(s in m["prefix"] or s in m["suffix"] for s in FIM_SENTINELS):
        return None
    return m["prefix"], m["suffix"]


def fim_stop_ids(tok: Tokenizer) -> frozenset[int]:
    """Ids that end a FIM completion: the four FIM sentinels and eos."""
    sp = tok.special
    return frozenset((sp.fim_prefix, sp.fim_middle, sp.fim_suffix, sp.file_separator, sp.eos))


# -- chat (CodeGemma 7B-IT) ----------------------------------------------------------------
def fold_system(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Gemma has no system role: prepend a leading system message to the first user turn.

    The system text is followed by "\\n\\n" and then the user's text, the convention Gemma's own
    documentation suggests. Only a system message in first position is accepted.
    """
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[0].get("role") != "system":
        return msgs
    system, rest = msgs[0], msgs[1:]
    if any(m.get("role") == "system" for m in rest):
        raise PromptError("only one system message, in first position, can be folded")
    if not rest or rest[0].get("role") != "user":
        raise PromptError("a system message must be followed by a user message to fold it into")
    rest[0]["content"] = f"{system.get('content', '')}\n\n{rest[0].get('content', '')}"
    return rest


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) with assistant -> model, checking Gemma's user/model alternation."""
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system":
            raise PromptError(
                "Gemma's chat template has no system role; fold the system text into the first "
                "user turn with codegemma.prompts.fold_system(messages)"
            )
        if role not in CHAT_ROLES:
            raise PromptError(f"message {i} has role {role!r}; use 'user' or 'model'/'assistant'")
        if not isinstance(content, str):
            raise PromptError(f"message {i} content must be a str, got {type(content).__name__}")
        expected = "user" if i % 2 == 0 else "model"
        if CHAT_ROLES[role] != expected:
            raise PromptError(
                f"message {i} is a {role!r} turn but roles must alternate user/model starting "
                "with user"
            )
        turns.append((CHAT_ROLES[role], content.strip()))  # the official template trims
    return turns


def _turn_ids(tok: Tokenizer, role: str, content: str) -> tuple[list[int], list[int], list[int]]:
    """(header, body, trailer) of one turn: <sot>role\\n | content<eot> | \\n"""
    sp = tok.special
    if sp.start_of_turn is None or sp.end_of_turn is None:
        raise PromptError(
            f"{tok.path} has no <start_of_turn>/<end_of_turn> tokens; chat needs a Gemma "
            "tokenizer with turn tokens"
        )
    header = [sp.start_of_turn, *tok.encode(role + "\n")]
    return header, [*tok.encode(content), sp.end_of_turn], tok.encode("\n")


def chat_prompt(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Ids of Gemma's chat template; with add_generation_prompt it ends `<start_of_turn>model\\n`.

    Role header, content and trailer are encoded separately so a reply's tokens are the same in
    a prompt, in training (chat_example) and when generated.
    """
    turns = _turns(messages)
    if not turns:
        raise PromptError("chat_prompt needs at least one message")
    if add_generation_prompt and turns[-1][0] == "model":
        raise PromptError("the last message must be a user turn to add a generation prompt")
    ids = [tok.special.bos]
    for role, content in turns:
        header, body, trailer = _turn_ids(tok, role, content)
        ids += header + body + trailer
    if add_generation_prompt:
        ids += _turn_ids(tok, "model", "")[0]
    return ids


def chat_example(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool]]:
    """SFT example: ids and a loss mask that is True on each model reply and its <end_of_turn>.

    User turns, the `<start_of_turn>model\\n` headers and the "\\n" after each turn are masked out.
    """
    turns = _turns(messages)
    if not any(role == "model" for role, _ in turns):
        raise PromptError("chat_example needs at least one model reply to learn from")
    ids, mask = [tok.special.bos], [False]
    for role, content in turns:
        header, body, trailer = _turn_ids(tok, role, content)
        ids += header + body + trailer
        mask += [False] * len(header) + [role == "model"] * len(body) + [False] * len(trailer)
    return ids, mask


def chat_stop_ids(tok: Tokenizer) -> frozenset[int]:
    """Ids that end a chat reply: <end_of_turn> (when present) and eos."""
    sp = tok.special
    return frozenset(i for i in (sp.end_of_turn, sp.eos) if i is not None)
