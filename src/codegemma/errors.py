"""The errors codegemma raises on purpose: one family under `CodegemmaError`.

Each says what is wrong and how to fix it; the command line catches the base once and prints
`codegemma <command>: error: <message>` (and `fix: ...` when the error carries one) with exit
code 2, and a traceback only under `--debug`. Errors about a bad value are also `ValueError`s,
so callers that caught those before still do.

    CodegemmaError
    ├── UsageError              a bad argument or option value (command line, API)
    ├── ConfigError             a model config.json that cannot describe a Gemma model
    ├── CheckpointError         a model directory or weights file that cannot be loaded
    ├── TokenizerError          a tokenizer file that cannot be used
    ├── PromptError             a prompt that cannot be laid out
    ├── TokenizerTrainingError  bad arguments or corpus for tokenizer training
    ├── DataPipelineError       `codegemma data`: sources, FIM settings, shards
    │   ├── SourceError, FimError, ShardError
    ├── TrainConfigError        a training configuration that cannot run
    ├── TrainDataError          training data that does not fit the model or the config
    │   └── SFTDataError        a chat JSONL file that cannot be used
    ├── TrainCheckpointError    a training checkpoint that cannot be resumed from
    └── EvalError               a task set, samples file or toolchain the evaluation cannot use
"""

from __future__ import annotations


class CodegemmaError(Exception):
    """Base of every error codegemma raises on purpose. `fix`, when given, is the remedy as one
    sentence; the command line prints it after the message."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class UsageError(CodegemmaError, ValueError):
    """A bad argument or option value; the message names the option and its allowed values."""


class ConfigError(CodegemmaError, ValueError):
    """A configuration that cannot describe a Gemma model; the message names field and fix."""


class CheckpointError(CodegemmaError, ValueError):
    """A model directory or weights file that cannot be loaded; the message names file and fix."""


class TokenizerError(CodegemmaError, ValueError):
    """A tokenizer file that codegemma cannot use, or bad input; the message says how to fix it."""


class PromptError(CodegemmaError, ValueError):
    """A prompt that cannot be laid out; the message names the problem and the fix."""


class TokenizerTrainingError(CodegemmaError, ValueError):
    """Bad arguments or corpus for tokenizer training; the message says how to fix it."""


class DataPipelineError(CodegemmaError, ValueError):
    """`codegemma data` cannot go on; the message names the input and the fix."""


class SourceError(DataPipelineError):
    """A source that cannot be read; the message names the source and the fix."""


class FimError(DataPipelineError):
    """Bad FIM configuration or input; the message names the field and the fix."""


class ShardError(DataPipelineError):
    """A shard directory that is incomplete or does not match its manifest."""


class TrainConfigError(CodegemmaError, ValueError):
    """A training configuration that cannot run; the message names the field and the fix."""


class TrainDataError(CodegemmaError, ValueError):
    """Training data that does not fit the model or the config; the message says how to fix it."""


class SFTDataError(TrainDataError):
    """A chat JSONL file that cannot be used; the message names the line and the fix."""


class TrainCheckpointError(CodegemmaError, ValueError):
    """A training checkpoint that cannot be resumed from; the message says why and what to do."""


class EvalError(CodegemmaError, ValueError):
    """A task set, samples file or toolchain the evaluation cannot use; the message says how to
    fix it."""
