"""Stage the bundled model's corpus: the CPython standard library's Python sources (PSF licence).

Copies every `*.py` file of this interpreter's standard library (sysconfig's `stdlib` path),
leaving out `site-packages` (third-party code, different on every machine) and `__pycache__`,
into OUT/train/Lib and OUT/heldout/Lib: a file goes to held-out when the first byte of the sha256
of its relative path is below 256 * heldout_fraction, so the split is the same on every machine
with the same Python. Writes OUT/SOURCES.json: Python version, licence, file and byte counts, and
a digest of the file list, which MODEL_CARD.md quotes.

With `--packages`, also stages the permissively licensed pure-Python packages installed in this
interpreter's site-packages, one repository each, and their LICENSES.json
(scripts/package_corpus.py; `codegemma data prepare` takes them as the `NAME=PATH` lines of
OUT/packages-train.txt and OUT/packages-heldout.txt).

    python scripts/stdlib_corpus.py build/corpus [--heldout 0.02] [--packages]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: Path) -> list[Path]:
    files = (p for p in root.rglob("*.py") if p.is_file() and not SKIP_PARTS & set(p.parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str, fraction: float) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < 256 * fraction


def stage(out: Path, heldout_fraction: float) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    if out.exists():
        shutil.rmtree(out)
    counts = {"train": [0, 0], "heldout": [0, 0]}
    listing = hashlib.sha256()
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        split = "heldout" if is_heldout(rel, heldout_fraction) else "train"
        dest = out / split / "Lib" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        counts[split][0] += 1
        counts[split][1] += dest.stat().st_size
        listing.update(f"{split}\t{rel}\n".encode())
    info = {
        "source": "CPython standard library (Lib/*.py), site-packages excluded",
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "licence": "PSF License Agreement (Python Software Foundation License Version 2)",
        "stdlib_path": str(root),
        "heldout_fraction": heldout_fraction,
        "files": {k: v[0] for k, v in counts.items()},
        "bytes": {k: v[1] for k, v in counts.items()},
        "file_list_sha256": listing.hexdigest(),
    }
    (out / "SOURCES.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--heldout", type=float, default=0.02, help="held-out share of files")
    parser.add_argument(
        "--packages",
        action="store_true",
        help="also stage the permissively licensed packages of this Python's site-packages",
    )
    args = parser.parse_args()
    info = stage(args.out, args.heldout)
    if args.packages:
        from package_corpus import default_site_packages
        from package_corpus import stage as stage_packages

        record = stage_packages(args.out, default_site_packages(), args.heldout)
        info["packages"] = record["totals"]
        (args.out / "SOURCES.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
