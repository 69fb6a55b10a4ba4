"""Build llama.cpp once, CPU only, as the anchor for the GGUF interop test and benchmarks.

The source is the llama.cpp vendored in the `llama-cpp-python` sdist (vendor/llama.cpp), fetched
from PyPI with pip (`pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`), so the
anchor is one pinned release rather than whatever a git checkout holds today. The build goes to

    ${CODEGEMMA_LLAMACPP_DIR:-${XDG_CACHE_HOME:-~/.cache}/codegemma/llama.cpp/<VERSION>}

and its executables to <that>/build/bin, which the script prints last. A second run finds the
stamp of a finished build with the same settings and prints the directory at once.

Settings: Release, static libraries, no CURL/OpenSSL, no web UI download, no tests or examples
beyond the targets below. `GGML_NATIVE=OFF` and the x86 options turned on one by one from this
CPU's /proc/cpuinfo flags (SSE4.2, AVX, AVX2, BMI2, FMA, F16C, AVX-VNNI, AVX-512F/VBMI/VNNI/BF16),
AMX always off: on these VMs AMX tile instructions raise SIGILL although the flags list AMX, so a
native build crashes. Targets: llama-bench, llama-completion and llama-simple (greedy tokens),
llama-quantize, llama-server, llama-tokenize.

    python scripts/build_llamacpp.py                  # build (nice -n 10, -j 2) and print bin dir
    python scripts/build_llamacpp.py --check          # print bin dir if built, else exit 1
    python scripts/build_llamacpp.py --sdist FILE.tar.gz --jobs 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
# built in this order: the command-line tools first, then the server, which needs the multimodal
# library (tools/mtmd, most of the build)
STAGES = (
    ("llama-bench", "llama-quantize", "llama-tokenize", "llama-simple", "llama-completion"),
    ("llama-server",),
)
TARGETS = tuple(t for stage in STAGES for t in stage)
# /proc/cpuinfo flags -> the GGML option they allow (all flags of a row must be present)
ISA_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
FIXED_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_NATIVE": "OFF",
    "GGML_AMX_TILE": "OFF",
    "GGML_AMX_INT8": "OFF",
    "GGML_AMX_BF16": "OFF",
    "GGML_CCACHE": "OFF",
    "LLAMA_CURL": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",  # else the server's UI assets are downloaded at build time
}


def default_dir(version: str = VERSION) -> Path:
    override = os.environ.get("CODEGEMMA_LLAMACPP_DIR")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "codegemma" / "llama.cpp" / version


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_options(flags: set[str]) -> dict[str, str]:
    isa = {opt: "ON" if all(f in flags for f in need) else "OFF" for opt, need in ISA_OPTIONS}
    return {**FIXED_OPTIONS, **isa}


def bin_dir(root: Path | None = None) -> Path | None:
    """The bin directory of a finished build under `root` (default_dir()), or None."""
    root = root or default_dir()
    stamp = root / "build" / "codegemma-build.json"
    bindir = root / "build" / "bin"
    if not stamp.is_file() or not all((bindir / t).is_file() for t in TARGETS):
        return None
    return bindir


def _stamp(root: Path) -> dict:
    try:
        return json.loads((root / "build" / "codegemma-build.json").read_text())
    except (OSError, ValueError):
        return {}


def fetch_source(root: Path, sdist: Path | None) -> Path:
    """vendor/llama.cpp of the sdist, extracted to root/src (once)."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            cmd += [f"llama-cpp-python=={VERSION}", "-d", tmp, "--quiet"]
            print("+", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                sys.exit(f"{sdist}: no vendor/llama.cpp inside (expected {prefix})")
            tar.extractall(tmp, members=members, filter="data")
        shutil.move(Path(tmp) / prefix, src)
    return src


def build(root: Path, sdist: Path | None, jobs: int) -> Path:
    options = cmake_options(cpu_flags())
    done = bin_dir(root)
    if done and _stamp(root).get("options") == options:
        return done
    src = fetch_source(root, sdist)
    out = root / "build"
    nice = ["nice", "-n", "10"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(src), "-B", str(out), *gen]
    configure += [f"-D{k}={v}" for k, v in options.items()]
    start = time.time()
    builds = [["cmake", "--build", str(out), "-j", str(jobs), "--target", *t] for t in STAGES]
    for cmd in (configure, *builds):
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(nice + cmd).returncode:
            sys.exit(f"llama.cpp build failed at: {' '.join(cmd)} (rerun to resume; see above)")
    stamp = {"version": VERSION, "options": options, "seconds": round(time.time() - start)}
    (out / "codegemma-build.json").write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"built in {stamp['seconds']} s", file=sys.stderr)
    return out / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="build root (default: see above)")
    parser.add_argument("--sdist", type=Path, default=None, help="an already downloaded sdist")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (2)")
    parser.add_argument("--check", action="store_true", help="only print the bin dir if built")
    args = parser.parse_args()
    root = (args.dir or default_dir()).expanduser().resolve()
    if args.check:
        found = bin_dir(root)
        if found is None:
            sys.exit(f"llama.cpp is not built under {root}: run python scripts/build_llamacpp.py")
        print(found)
        return
    print(build(root, args.sdist, args.jobs))


if __name__ == "__main__":
    main()
