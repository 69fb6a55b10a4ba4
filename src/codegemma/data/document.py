"""The one record type every data step reads and writes, and language detection.

A `Document` is a source file with its repository and path (datatrove style: text plus
metadata). Language is decided from the file extension first, then from a shebang line, so
`language_of("bin/tool", "#!/usr/bin/env python3\\n...")` is "python".

    >>> language_of("src/main.rs")
    'rust'
    >>> Document(text="x = 1\\n", repo="r", path="a.py").id
    'r/a.py'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

LANGUAGES = (
    "python",
    "javascript",
    "typescript",
    "java",
    "kotlin",
    "go",
    "rust",
    "c",
    "cpp",
    "csharp",
)

EXTENSIONS: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".pyw": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".java": "java",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".go": "go",
    ".rs": "rust",
    ".c": "c",
    ".h": "c",  # a .h header is C unless its repo says otherwise; C is the safe guess
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".c++": "cpp",
    ".hpp": "cpp",
    ".hh": "cpp",
    ".hxx": "cpp",
    ".h++": "cpp",
    ".ipp": "cpp",
    ".inl": "cpp",
    ".cs": "csharp",
}

# Interpreter named on a shebang line -> language (`#!/usr/bin/env node`, `#!/usr/bin/python3.11`).
_SHEBANG = re.compile(r"^#!\s*(?:\S*/)?(?:env\s+(?:-\S+\s+)*)?([\w.+-]+)")
INTERPRETERS: dict[str, str] = {
    "python": "python",
    "python2": "python",
    "python3": "python",
    "pypy": "python",
    "pypy3": "python",
    "node": "javascript",
    "nodejs": "javascript",
    "deno": "typescript",
    "ts-node": "typescript",
    "kotlin": "kotlin",
    "kotlinc": "kotlin",
    "kscript": "kotlin",
}


@dataclass(slots=True)
class Document:
    """One source file. `metadata` carries step annotations (source, PII counts, ...)."""

    text: str
    repo: str  # repository name (a source-dir/archive/git name, or the `repo` field of JSONL)
    path: str  # posix path inside the repo
    language: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.repo}/{self.path}"


def language_of(path: str, text: str | None = None) -> str | None:
    """The language of a file by extension, else by its shebang line; None when neither says."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if text and text.startswith("#!"):
        m = _SHEBANG.match(text[: text.find("\n") if "\n" in text else len(text)])
        if m:
            name = m.group(1)
            # python3.11 -> python3 -> python: versioned interpreters share the base name
            for candidate in (name, name.rstrip("0123456789."), name.split(".")[0]):
                if candidate in INTERPRETERS:
                    return INTERPRETERS[candidate]
    return None
