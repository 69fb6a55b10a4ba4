"""The GGUF benchmarks' files, built once into a cache directory and shared by bench_quant.py and
bench_llamacpp.py: one random-weight checkpoint of the 2B config (bench_generate.make_checkpoint,
bf16) with the bundled model's tokenizer, and our exports of it (`codegemma export gguf`), keyed
by export.py's hash so that a change to the writer makes new files."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path


def default_cache() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "codegemma" / "bench" / "gguf-2b"


def checkpoint(cache: Path) -> Path:
    """The random-weight 2B checkpoint with the bundled tokenizer (built once)."""
    from bench_generate import make_checkpoint

    from codegemma.api import BUNDLED_MODEL

    out = cache / "hf-2b-seed0"
    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    tmp = cache / "hf-2b-seed0.part"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"# building the random-weight 2B checkpoint in {out}", file=sys.stderr)
    make_checkpoint("2b", tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BUNDLED_MODEL / name, tmp / name)
    os.replace(tmp, out)
    return out


def cached_gguf(cache: Path, type_name: str) -> Path:
    """Where the GGUF of `type_name` lives in `cache` (ours or llama-quantize's of ours)."""
    import codegemma.export as export

    key = hashlib.sha256(Path(export.__file__).read_bytes()).hexdigest()[:10]
    return cache / f"2b-{type_name}-{key}.gguf"


def exported_gguf(cache: Path, type_name: str) -> Path:
    """Our export of the checkpoint to `type_name` (bf16, q8_0, q4_0), made once."""
    import codegemma.export as export

    out = cached_gguf(cache, type_name)
    if not out.is_file():
        start = time.time()
        export.export_gguf(checkpoint(cache), out, type=type_name, name="codegemma-2b-random")
        print(f"# wrote {out.name} in {time.time() - start:.0f} s", file=sys.stderr)
    return out
