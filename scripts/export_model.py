"""Copy a training run's newest sound checkpoint into a model directory (the bundled model).

The checkpoint is checked whole first, as a resume checks it (sizes, checksums, trainer state,
weights, tokenizer); broken newer ones are named in a warning and left in place. Its `model/`
folder already is a Hugging Face model directory with its tokenizer; it is copied to a temp dir
beside the target and swapped in by renames, so the target is at every moment either the old
model or the new one. The card and plot are written afterwards (`make model-card`).

    python scripts/export_model.py build/model/run src/codegemma/assets/codegemma-tiny
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from codegemma.errors import CodegemmaError
from codegemma.train.run_checkpoint import resume_checkpoint


def export(run_dir: Path, out: Path) -> Path:
    found = resume_checkpoint(run_dir, set_aside=False)
    if found is None:
        raise SystemExit(f"{run_dir} has no checkpoint; train first (codegemma train)")
    ckpt = found.path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    shutil.copytree(ckpt / "model", tmp, dirs_exist_ok=True)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    try:
        print(f"exported {export(args.run_dir, args.out)} -> {args.out}")
    except CodegemmaError as e:
        fix = f"\n  fix: {e.fix}" if e.fix else ""
        raise SystemExit(f"export_model: error: {e}{fix}") from e


if __name__ == "__main__":
    main()
