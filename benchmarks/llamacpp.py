"""llama.cpp as the anchor: its build, and its tools run as subprocesses with their peak memory.

Shared by bench_llamacpp.py, bench_editor.py and tests/test_llamacpp_interop.py. The build is
scripts/build_llamacpp.py's (`make llamacpp`); nothing here builds it.

- `tools()`: the build's bin dir, or None; `require_tools()` exits with the command to build it.
- `run_measured(cmd)`: a subprocess's stdout and its peak resident set (VmHWM, polled from
  /proc/PID/status until it exits: per process, unlike ru_maxrss, which Linux carries across
  fork/exec from the parent that spawned it).
- `llama_bench`, `llama_quantize`: the two command-line tools, their JSON / files.
- `LlamaServer`: llama-server on a free loopback port, as a context manager, with `post()`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_llamacpp  # noqa: E402

BUILD_HINT = (
    "build it once with `make llamacpp` (python scripts/build_llamacpp.py, ~1 h on 2 cores)"
)


def tools() -> Path | None:
    """The llama.cpp bin dir (scripts/build_llamacpp.py's; CODEGEMMA_LLAMACPP_DIR moves it)."""
    return build_llamacpp.bin_dir()


def require_tools(*names: str) -> Path:
    """The bin dir holding the executables `names` (default: all the build makes), else exit
    with the command that builds them."""
    bindir = build_llamacpp.default_dir() / "build" / "bin"
    missing = [n for n in names or build_llamacpp.TARGETS if not (bindir / n).is_file()]
    if missing:
        sys.exit(f"llama.cpp's {', '.join(missing)} not built under {bindir}: {BUILD_HINT}")
    return bindir


def version() -> str:
    return f"llama.cpp vendored in llama-cpp-python {build_llamacpp.VERSION}"


# -- peak memory ----------------------------------------------------------------------------------
def vm_hwm_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRss:
    """Polls a live process's VmHWM (its own peak, monotonic) until stopped; `.bytes` the last
    reading, which is the peak up to a poll interval before the process ended."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval, self.bytes = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = vm_hwm_bytes(self.pid)
            if value:
                self.bytes = max(self.bytes, value)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        value = vm_hwm_bytes(self.pid)  # a last reading, if the process is still there
        if value:
            self.bytes = max(self.bytes, value)
        self._stop.set()
        self._thread.join()
        return self.bytes


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """(stdout, peak RSS bytes) of `cmd`; raises with its stderr's tail if it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = PeakRss(proc.pid)
    # VmHWM is read until the process is reaped: communicate() returns at EOF, before the wait
    out, err = proc.communicate()
    rss = peak.stop()
    if proc.returncode:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return out, rss


# -- command-line tools ---------------------------------------------------------------------------
def llama_quantize(src: Path, dst: Path, type_name: str, threads: int = 2) -> Path:
    """`llama-quantize src dst TYPE threads`, written beside `dst` and renamed into place."""
    tmp = dst.with_name(dst.name + ".part")
    cmd = [
        str(require_tools("llama-quantize") / "llama-quantize"),
        str(src),
        str(tmp),
        type_name,
        str(threads),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, dst)
    return dst


def llama_bench(
    model: Path, *, threads: int, prompt: int, gen: int, repetitions: int
) -> tuple[dict[str, float], int]:
    """llama-bench's mean tok/s for pp{prompt} and tg{gen} ({"prefill": .., "decode": ..}, each
    over `repetitions` timed runs after its warm-up) and the run's peak RSS in bytes."""
    cmd = [str(require_tools("llama-bench") / "llama-bench"), "-m", str(model), "-t", str(threads)]
    cmd += ["-p", str(prompt), "-n", str(gen), "-r", str(repetitions), "-o", "json"]
    out, rss = run_measured(cmd)
    rates = {}
    for test in json.loads(out):
        kind = "prefill" if test["n_prompt"] and not test["n_gen"] else "decode"
        rates[kind] = float(test["avg_ts"])
    return rates, rss


# -- llama-server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from e


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the server exited ({proc.returncode}) while starting:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no healthy server at {url} after {timeout:.0f} s (log: {log})")


@contextmanager
def server_process(cmd: list[str], port: int, log: Path, *, env=None, timeout: float = 600):
    """Start a server command listening on `port`, wait for /health, yield (url, PeakRss);
    terminate it on exit. Its output goes to `log`."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    peak = PeakRss(proc.pid)
    try:
        wait_healthy(url, proc, log, timeout)
        yield url, peak
    finally:
        peak.stop()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def llama_server_cmd(model: Path, port: int, *, threads: int, ctx: int, extra=()) -> list[str]:
    """llama-server on one slot (`-np 1`), `ctx` tokens of context, CPU threads for both the
    batch and the token phase, the model's own (no chat) template."""
    cmd = [
        str(require_tools("llama-server") / "llama-server"),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
    ]
    cmd += ["--port", str(port), "-t", str(threads), "-tb", str(threads), "-c", str(ctx)]
    return cmd + ["-np", "1", "--no-webui", *extra]
