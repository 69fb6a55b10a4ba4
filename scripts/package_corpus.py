"""Stage the permissively licensed pure-Python packages installed here as training repositories.

Beside the CPython standard library (scripts/stdlib_corpus.py), the bundled model can learn from
the Python sources of the packages installed in this interpreter's site-packages (the `.venv`'s;
nothing is downloaded). Each distribution is one repository, named by its normalized name and
made of the `*.py` files its RECORD lists under its top-level directories and modules. The
pipeline (`codegemma data prepare`) then deduplicates, redacts PII and decontaminates them as it
does any source.

Licence rule (from `importlib.metadata`; a package is kept only when the rule says permissive):

* `License-Expression` (SPDX, PEP 639), when present, is the whole answer: every licence in it
  must be one of PERMISSIVE, whatever joins them. "MIT OR Apache-2.0" is kept; "MPL-2.0 OR MIT"
  is not, though MIT could be chosen, because a corpus that records one licence per package
  should not depend on which option it picked. `WITH` takes only exceptions that add
  permissions (ACCEPTED_EXCEPTIONS). An identifier outside the list (Zlib, BSL-1.0, CC0-1.0,
  LicenseRef-...) excludes the package: the list is what this corpus promises, not every
  licence that might be permissive.
* Otherwise the `License` field (when it is a short name, not a whole licence text) and the
  `License ::` classifiers are read together: any licence among them outside the families MIT,
  BSD, Apache, PSF, ISC excludes the package; at least one of those families, and no other,
  keeps it. Nothing readable ("UNKNOWN", an empty field, only a licence text) is an unknown
  licence: excluded.

Also excluded: distributions without a RECORD, with no Python source inside site-packages
(compiled-only packages, editable installs), and a second copy of a distribution. Left out of
every package: tests and test data (folders `tests`, `test`, `testing`, `testdata`, ...; files
`test_*.py`, `*_test.py`, `conftest.py`), vendored copies of other projects (`_vendor`, `vendor`,
`extern`, `third_party`, ...), which carry their own licences, and `__pycache__`.

A file goes to held-out like a stdlib file (the first byte of the sha256 of `name/path`). Writes
OUT/{train,heldout}/packages/NAME/..., OUT/packages-{train,heldout}.txt (`NAME=PATH` per line, the
arguments of `codegemma data prepare`), and OUT/LICENSES.json: every package kept (name, version,
licence as declared, the licences read, files, bytes, top-level names) and every one excluded,
with the reason. Everything is sorted, so the same site-packages gives the same bytes.

    python scripts/package_corpus.py build/corpus [--site-packages DIR] [--heldout 0.02]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_corpus import is_heldout  # noqa: E402

PERMISSIVE = {  # SPDX id (lower case) -> family
    "mit": "MIT",
    "mit-0": "MIT",
    "bsd-2-clause": "BSD",
    "bsd-3-clause": "BSD",
    "0bsd": "BSD",
    "apache-2.0": "Apache",
    "psf-2.0": "PSF",
    "python-2.0": "PSF",
    "isc": "ISC",
}
ACCEPTED_EXCEPTIONS = {"llvm-exception"}  # Apache-2.0 WITH LLVM-exception only adds permissions
FAMILIES = {  # words in a License field or a classifier -> family
    "MIT": re.compile(r"\bmit\b"),
    "BSD": re.compile(r"\bbsd\b|\b[0-3]-clause\b"),
    "Apache": re.compile(r"\bapache\b"),
    "PSF": re.compile(r"\bpsfl?\b|python software foundation"),
    "ISC": re.compile(r"\biscl?\b"),
}
OTHER_LICENCES = re.compile(
    r"\b(a|l)?gpl|\bgnu\b|\bmpl\b|mozilla|\beupl\b|\bepl\b|eclipse|\bcddl\b|proprietary"
    r"|commercial|\bsspl\b|\bbusl\b|creative commons|\bcc[- ]by|public domain|unlicense"
    r"|\bzlib\b|boost|\bartistic\b|\bcnri\b|\bhpnd\b"
)
MAX_NAME_CHARS = 80  # a longer License field is a licence text, not a name
TEST_DIRS = {
    "test",
    "tests",
    "_tests",
    "testing",
    "_testing",
    "testdata",
    "test_data",
    "tests_data",
}
VENDOR_DIRS = {"_vendor", "vendor", "vendored", "_vendored", "extern", "_extern", "third_party"}
SKIP_DIRS = TEST_DIRS | VENDOR_DIRS | {"__pycache__"}
COMPILED = (".so", ".pyd", ".dylib", ".dll")


@dataclass(frozen=True)
class Licence:
    """What a distribution's metadata says (`declared`), the licences read from it, and the
    verdict: `reason` is empty for a permissive licence, else why the package is excluded."""

    declared: str
    licences: tuple[str, ...]
    reason: str

    @property
    def permissive(self) -> bool:
        return not self.reason


def classify(meta: metadata.PackageMetadata) -> Licence:
    """The licence verdict of one distribution's metadata (rule in the module docstring)."""
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return from_expression(expression)
    text = (meta.get("License") or "").strip()
    first = text.splitlines()[0].strip() if text else ""
    name = first if first.upper() != "UNKNOWN" and len(first) <= MAX_NAME_CHARS else ""
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    named = [c.split("::")[-1].strip() for c in classifiers if c.count("::") >= 2]
    named = [n for n in named if n != "OSI Approved"]
    declared = "; ".join(x for x in [name, *named] if x) or "(none)"
    found: set[str] = set()
    for item, is_classifier in [(name, False), *((n, True) for n in named)]:
        families = {f for f, rx in FAMILIES.items() if rx.search(item.lower())}
        # a classifier always names a licence; a License field may say nothing ("Dual License")
        if OTHER_LICENCES.search(item.lower()) or (is_classifier and not families):
            return Licence(declared, tuple(sorted(found)), f"licence not in the list: {item}")
        found |= families
    if not found:
        return Licence(declared, (), "unknown licence")
    return Licence(declared, tuple(sorted(found)), "")


def from_expression(expression: str) -> Licence:
    """Verdict on an SPDX expression: every licence in it permissive, exceptions accepted."""
    tokens = re.findall(r"[()]|[^\s()]+", expression)
    licences: list[str] = []
    after_with = False
    for tok in tokens:
        up = tok.upper()
        if up in {"AND", "OR", "(", ")"}:
            continue
        if up == "WITH":
            after_with = True
            continue
        if after_with:
            after_with = False
            if tok.lower() not in ACCEPTED_EXCEPTIONS:
                return Licence(
                    expression, tuple(licences), f"licence exception not accepted: {tok}"
                )
            continue
        spdx = tok.rstrip("+").lower()
        if spdx not in PERMISSIVE:
            return Licence(expression, tuple(licences), f"licence not in the list: {tok}")
        licences.append(PERMISSIVE[spdx])
    if not licences:
        return Licence(expression, (), "unknown licence")
    return Licence(expression, tuple(sorted(set(licences))), "")


def normalized_name(name: str) -> str:
    """PEP 503's normalized project name (the repository name)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def source_files(dist: metadata.Distribution, site: Path) -> tuple[list[str], bool]:
    """(sorted RECORD paths of the Python sources to keep, whether it lists compiled modules)."""
    keep, compiled = [], False
    for f in dist.files or ():
        parts = PurePosixPath(str(f)).parts
        if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        compiled |= parts[-1].endswith(COMPILED)
        if not parts[-1].endswith(".py") or parts[-1].startswith("__editable__"):
            continue
        if SKIP_DIRS & set(parts[:-1]) or _is_test_file(parts[-1]):
            continue
        path = site / Path(*parts)
        if path.is_file() and not path.is_symlink():
            keep.append(PurePosixPath(*parts).as_posix())
    return sorted(keep), compiled


def _is_test_file(name: str) -> bool:
    return name == "conftest.py" or name.startswith("test_") or name.endswith("_test.py")


@dataclass
class Package:
    name: str
    version: str
    licence: Licence
    files: list[str] = field(default_factory=list)
    reason: str = ""


def survey(site: Path) -> list[Package]:
    """Every distribution in `site`, sorted by name, with its licence, files and verdict."""
    dists = sorted(
        metadata.distributions(path=[str(site)]),
        key=lambda d: (normalized_name(d.metadata["Name"] or ""), d.version or "", str(d._path)),
    )
    seen: set[str] = set()
    out = []
    for dist in dists:
        name = normalized_name(dist.metadata["Name"] or "")
        pkg = Package(name=name, version=dist.version or "", licence=classify(dist.metadata))
        if name in seen:
            pkg.reason = "a second copy of this distribution"
        elif not pkg.licence.permissive:
            pkg.reason = pkg.licence.reason
        elif dist.files is None:
            pkg.reason = "no RECORD"
        else:
            pkg.files, compiled = source_files(dist, site)
            if not pkg.files:
                pkg.reason = "compiled only" if compiled else "no Python sources in site-packages"
        seen.add(name)
        out.append(pkg)
    return out


def stage(out: Path, site: Path, heldout_fraction: float) -> dict:
    """Copy the kept packages' sources into OUT and write the specs and LICENSES.json."""
    for split in ("train", "heldout"):
        shutil.rmtree(out / split / "packages", ignore_errors=True)
    packages = survey(site)
    kept, excluded, specs = [], [], {"train": [], "heldout": []}
    for pkg in packages:
        if pkg.reason:
            excluded.append(
                {
                    "name": pkg.name,
                    "version": pkg.version,
                    "licence": pkg.licence.declared,
                    "reason": pkg.reason,
                }
            )
            continue
        files, sizes = {"train": 0, "heldout": 0}, {"train": 0, "heldout": 0}
        for rel in pkg.files:
            split = "heldout" if is_heldout(f"{pkg.name}/{rel}", heldout_fraction) else "train"
            dest = out / split / "packages" / pkg.name / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(site / rel, dest)
            files[split] += 1
            sizes[split] += dest.stat().st_size
        for split in specs:
            if files[split]:
                specs[split].append(f"{pkg.name}={out / split / 'packages' / pkg.name}")
        kept.append(
            {
                "name": pkg.name,
                "version": pkg.version,
                "licence": pkg.licence.declared,
                "licences": list(pkg.licence.licences),
                "files": files,
                "bytes": sizes,
                "top_level": sorted({PurePosixPath(r).parts[0] for r in pkg.files}),
            }
        )
    for split, lines in specs.items():
        (out / f"packages-{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (out / f"packages-{split}.txt").write_text("".join(f"{x}\n" for x in lines))
    record = {
        "source": "pure-Python sources of the permissively licensed packages installed in "
        "site-packages (one repository each; tests and vendored code left out)",
        "site_packages": str(site),
        "permissive": sorted(set(PERMISSIVE.values())),
        "heldout_fraction": heldout_fraction,
        "packages": kept,
        "excluded": excluded,
        "totals": {
            "packages": len(kept),
            "files": {s: sum(p["files"][s] for p in kept) for s in ("train", "heldout")},
            "bytes": {s: sum(p["bytes"][s] for p in kept) for s in ("train", "heldout")},
        },
    }
    (out / "LICENSES.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def default_site_packages() -> Path:
    """This interpreter's site-packages (the virtualenv's when run with .venv/bin/python)."""
    return Path(sysconfig.get_paths()["purelib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--site-packages", type=Path, default=None, help="default: this Python's")
    parser.add_argument("--heldout", type=float, default=0.02, help="held-out share of files")
    args = parser.parse_args()
    record = stage(args.out, args.site_packages or default_site_packages(), args.heldout)
    print(json.dumps(record["totals"], indent=2))


if __name__ == "__main__":
    main()
