"""scripts/package_corpus.py on a fake site-packages (dist-info METADATA + RECORD): permissive
packages are kept with their version and licence, every other licence, unknown ones and
compiled-only packages are left out with the reason, tests and vendored code are never copied,
and the output is the same bytes every time; scripts/model_card.py's licence table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import package_corpus  # noqa: E402

# name -> (version, METADATA licence lines, files under site-packages)
FAKE = {
    "mitpkg": (
        "1.0",
        ["License-Expression: MIT"],
        [
            "mitpkg/__init__.py",
            "mitpkg/core.py",
            "mitpkg/tests/test_core.py",
            "mitpkg/_vendor/other.py",
            "mitpkg/test_helpers.py",
            "mitpkg/conftest.py",
            "mitpkg/data.json",
        ],
    ),
    "Dual_Pkg": ("0.3", ["License-Expression: MIT OR Apache-2.0"], ["dual/__init__.py"]),
    "bsd-single": (
        "2.0",
        ["License: BSD", "Classifier: License :: OSI Approved :: BSD License"],
        ["single.py"],
    ),
    "texty": (
        "5",
        [
            "License: Copyright (c) 2001 Someone, a whole licence text that is far too long to "
            "be the name of a licence",
            "Classifier: License :: OSI Approved :: Apache Software License",
        ],
        ["texty/__init__.py"],
    ),
    "choosy": ("1", ["License-Expression: MPL-2.0 OR MIT"], ["choosy.py"]),
    "gnu": (
        "1",
        ["Classifier: License :: OSI Approved :: GNU General Public License v3"],
        ["gnu.py"],
    ),
    "zope-ish": ("1", ["Classifier: License :: OSI Approved :: Zope Public License"], ["z.py"]),
    "mystery": ("0.1", ["License: UNKNOWN"], ["mystery.py"]),
    "compiled": (
        "3",
        ["License-Expression: BSD-3-Clause"],
        ["compiled/_ext.cpython-311-x86_64-linux-gnu.so"],
    ),
    "llvm": ("1", ["License-Expression: Apache-2.0 WITH LLVM-exception"], ["llvm.py"]),
}


def _fake_site(root: Path) -> Path:
    site = root / "site-packages"
    for name, (version, licence, files) in FAKE.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        meta = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *licence]
        (info / "METADATA").write_text("\n".join(meta) + "\n\n")
        record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
        (info / "RECORD").write_text("".join(f"{f},,\n" for f in record))
        for f in files:
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            (site / f).write_text(f"# {name}: {f}\nVALUE = {len(f)}\n")
    return site


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Path, dict]:
    site = _fake_site(tmp_path)
    out = tmp_path / "corpus"
    return out, package_corpus.stage(out, site, heldout_fraction=0.0)


def test_permissive_packages_are_kept_with_version_and_licence(staged) -> None:
    out, record = staged
    kept = {p["name"]: p for p in record["packages"]}
    assert list(kept) == ["bsd-single", "dual-pkg", "llvm", "mitpkg", "texty"]  # sorted
    assert kept["mitpkg"]["version"] == "1.0" and kept["mitpkg"]["licence"] == "MIT"
    assert kept["dual-pkg"]["licences"] == ["Apache", "MIT"]
    assert kept["bsd-single"]["licence"] == "BSD; BSD License"
    assert kept["texty"]["licences"] == ["Apache"]  # the classifier decides, not the text
    assert kept["mitpkg"]["top_level"] == ["mitpkg"] and kept["bsd-single"]["top_level"] == [
        "single.py"
    ]
    # the repository holds the package's sources only: no tests, vendored code or data
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in files if "/mitpkg/" in f] == [
        "train/packages/mitpkg/mitpkg/__init__.py",
        "train/packages/mitpkg/mitpkg/core.py",
    ]
    assert kept["mitpkg"]["files"] == {"train": 2, "heldout": 0}
    assert (out / "packages-train.txt").read_text().splitlines()[0] == (
        f"bsd-single={out / 'train' / 'packages' / 'bsd-single'}"
    )
    assert json.loads((out / "LICENSES.json").read_text()) == record


def test_other_unknown_and_compiled_only_packages_are_left_out(staged) -> None:
    _, record = staged
    reasons = {x["name"]: x["reason"] for x in record["excluded"]}
    assert reasons == {
        "choosy": "licence not in the list: MPL-2.0",  # one option is not enough
        "gnu": "licence not in the list: GNU General Public License v3",
        "zope-ish": "licence not in the list: Zope Public License",
        "mystery": "unknown licence",
        "compiled": "compiled only",
    }
    assert record["totals"]["packages"] == 5


def test_same_site_packages_same_bytes(tmp_path) -> None:
    site = _fake_site(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    package_corpus.stage(a, site, 0.5)
    package_corpus.stage(b, site, 0.5)

    def tree(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".txt"
        }

    assert tree(a) == tree(b)
    licences = json.loads((a / "LICENSES.json").read_text())
    assert sum(p["files"]["heldout"] for p in licences["packages"]) > 0  # the split is used


@pytest.mark.parametrize(
    ("expression", "ok"),
    [
        ("MIT", True),
        ("(MIT OR Apache-2.0) AND BSD-3-Clause", True),
        ("apache-2.0", True),
        ("GPL-3.0-or-later", False),
        ("MIT AND Zlib", False),
        ("LicenseRef-Proprietary", False),
        ("Apache-2.0 WITH Classpath-exception-2.0", False),
    ],
)
def test_spdx_expressions(expression, ok) -> None:
    assert package_corpus.from_expression(expression).permissive is ok


def test_model_card_lists_every_package(staged) -> None:
    pytest.importorskip("torch")
    import model_card

    _, record = staged
    table = model_card.licence_section(record)
    for p in record["packages"]:
        assert f"| {p['name']} | {p['version']} |" in table
    assert "mystery (unknown licence)" in table
    assert "CPython" in model_card.licence_section(None)
