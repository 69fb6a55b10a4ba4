"""An editor's typing session: `codegemma serve` against `llama-server` on the same GGUF weights.

The session is llama.vim's (`llama#fim` in llama.cpp's examples/llama.vim): the standard library's
json/encoder.py, the cursor at the start of the first code line past --before characters (3,000),
the lines before it as `input_prefix` (~3,000 characters, whole lines), the lines after it as
`input_suffix` (~--after, 1,000), and that line typed one character at a time: request k sends
the line's first k characters as `prompt`, with `cache_prompt: true`, `input_extra: []` and
`stream: false`, as llama.vim does; unlike llama.vim, sampling is greedy (`temperature` 0,
`top_k` 1, `samplers: ["top_k"]`), `ignore_eos: true` asks for exactly --n-predict tokens (32),
and neither a time limit (`t_max_predict_ms`) nor `n_indent` is sent (a random-weight model's
text would end at a different newline in each server), so every request does the same work.
One warm-up request comes first (the same request before the first keystroke, `n_predict: 0`:
llama.vim's cache warm-up), then one request per keystroke, each after the previous answered.

Per server: the warm-up's latency, p50/p95 of the keystrokes' latencies (client wall clock),
prompt tokens evaluated per keystroke (llama.cpp's `timings.prompt_n`, the tokens not reused from
its cache; ours: the same field where the server reports llama.cpp's `timings.cache_n` beside it,
else /metrics' prompt tokens minus cached ones), tokens generated, and tokens per decode step
(llama-server without a draft model: 1 by construction; ours: /metrics' generated tokens minus
the prefill's one over engine steps minus the prefill's one, per request). Servers run one at a
time, same GGUF file, same threads (OMP_NUM_THREADS and llama-server's -t/-tb).

llama-server settings: `-c 4096 -np 1 --cache-reuse 256`, batch/ubatch at their defaults (2048 /
512, so /infill keeps the whole ~3,000+1,000-character context: it keeps 3/4 of a batch of
prefix and 1/4 of suffix), and `--spm-infill` for the SPM rows. Ours: `--fim-mode psm|spm`,
`--max-batch-size 1`.

    python benchmarks/bench_editor.py                        # q4_0; llama-server and ours, PSM+SPM
    python benchmarks/bench_editor.py --type bf16 --keystrokes 24 --servers ours-spm,llama-spm
"""

from __future__ import annotations

import argparse
import inspect
import json
import json.encoder
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import llamacpp
from bench_files import default_cache
from bench_llamacpp import TYPES, gguf_file

SERVERS = ("llama-psm", "llama-spm", "ours-psm", "ours-spm")
LLAMA_FLAGS = ["--cache-reuse", "256"]


# -- the session ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    prefix: str  # the lines before the cursor line, each ending in "\n"
    line: str  # the line being typed
    suffix: str  # "\n" (the typed line's end) + the lines after it

    def request(self, typed: int, n_predict: int) -> dict:
        """llama.vim's /infill body with `typed` characters of the line typed."""
        prompt = self.line[:typed]
        return {
            "input_prefix": self.prefix,
            "input_suffix": self.suffix,
            "input_extra": [],
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "top_p": 1.0,
            "samplers": ["top_k"],
            "ignore_eos": True,
            "stream": False,
            "cache_prompt": True,
        }


def session(before: int, after: int) -> Session:
    text = Path(inspect.getsourcefile(json.encoder)).read_text()
    lines = text.splitlines(keepends=True)
    starts = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    # the cursor line: the first past `before` characters with at least 20 characters of code
    i = next(i for i, s in enumerate(starts) if s >= before and len(lines[i].strip()) >= 20)
    j = i
    while j > 0 and starts[i] - starts[j - 1] <= before:
        j -= 1
    k, size = i + 1, 0
    while k < len(lines) and size + len(lines[k]) <= after:
        size += len(lines[k])
        k += 1
    return Session("".join(lines[j:i]), lines[i].rstrip("\n"), "\n" + "".join(lines[i + 1 : k]))


# -- measuring ------------------------------------------------------------------------------------
def prometheus(url: str) -> dict[str, float] | None:
    """Unlabelled samples of /metrics (labelled ones summed under their bare name)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            values[m[1]] = values.get(m[1], 0.0) + float(m[3])
    return values


@dataclass
class Result:
    server: str
    warmup_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    per_step: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rss: int = 0
    notes: set[str] = field(default_factory=set)


def measure_ours(url: str, body: dict, result: Result) -> None:
    """One request to our server, with its /metrics deltas; notes what the response lacks."""
    before = prometheus(url) or {}
    r, seconds = timed_post(url, body)
    after = prometheus(url) or {}

    def delta(name: str) -> float:
        return after.get(f"codegemma_{name}", 0.0) - before.get(f"codegemma_{name}", 0.0)

    timings = r.get("timings") or {}
    if "cache_n" in timings and "prompt_n" in timings:
        evaluated = int(timings["prompt_n"])
    else:
        result.notes.add(
            "our /infill has no timings.cache_n (llama.cpp's protocol, issue 15): prompt tokens "
            "evaluated are /metrics' prompt tokens minus cached ones"
        )
        evaluated = int(delta("prompt_tokens_total") - delta("prompt_tokens_cached_total"))
    generated = int(r.get("tokens_predicted", timings.get("predicted_n", 0)))
    steps = delta("engine_steps_total")
    record(result, body, r, seconds, evaluated, generated)
    if body["n_predict"] and steps > 1:
        result.per_step.append((delta("generated_tokens_total") - 1) / (steps - 1))


def measure_llama(url: str, body: dict, result: Result) -> None:
    r, seconds = timed_post(url, body)
    timings = r.get("timings") or {}
    generated = int(timings.get("predicted_n", r.get("tokens_predicted", 0)))
    record(result, body, r, seconds, int(timings.get("prompt_n", 0)), generated)
    if body["n_predict"] and generated:
        result.per_step.append(1.0)  # no draft model: one token per decode step


def timed_post(url: str, body: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    r = llamacpp.post(url + "/infill", body)
    return r, time.perf_counter() - t


def record(result: Result, body: dict, r: dict, seconds: float, evaluated: int, generated: int):
    if body["n_predict"] == 0:
        result.warmup_s = seconds
        return
    result.latencies.append(seconds)
    result.evaluated.append(evaluated)
    result.generated.append(generated)
    result.texts.append(r.get("content", ""))
    if generated < body["n_predict"]:
        result.notes.add(
            f"{result.server} generated fewer than n_predict={body['n_predict']} tokens (stop_type "
            f"{r.get('stop_type')!r}): ignore_eos not honoured, or a stop rule of its own"
        )


def server_cmd(name: str, model: Path, port: int, threads: int) -> list[str]:
    impl, layout = name.split("-")
    if impl == "llama":
        extra = LLAMA_FLAGS + (["--spm-infill"] if layout == "spm" else [])
        return llamacpp.llama_server_cmd(model, port, threads=threads, ctx=4096, extra=extra)
    codegemma = Path(sys.executable).with_name("codegemma")
    cmd = [str(codegemma), "serve", "--model", str(model), "--port", str(port)]
    return cmd + ["--fim-mode", layout, "--max-batch-size", "1", "--log-level", "warning"]


def run_server(name: str, model: Path, s: Session, args, logs: Path) -> Result:
    port = llamacpp.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = server_cmd(name, model, port, args.threads)
    measure = measure_ours if name.startswith("ours") else measure_llama
    result = Result(name)
    with llamacpp.server_process(cmd, port, logs / f"{name}.log", env=env) as (url, peak):
        measure(url, s.request(0, 0), result)
        for k in range(1, min(args.keystrokes, len(s.line)) + 1):
            measure(url, s.request(k, args.n_predict), result)
            print(
                f"# {name} keystroke {k}: {result.latencies[-1]:.2f} s, "
                f"{result.evaluated[-1]} prompt tokens evaluated, {result.generated[-1]} generated",
                file=sys.stderr,
                flush=True,
            )
        result.rss = peak.stop()
    return result


# -- the table ------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def model_name(args) -> str:
    if args.model:
        return f"model {args.model}"
    return f"{args.type} GGUF of the random-weight 2B (bench_llamacpp.py)"


def report(results: dict[str, Result], args, s: Session) -> None:
    print(
        f"# {llamacpp.version()}; {model_name(args)}, "
        f"{args.threads} threads; json/encoder.py, {len(s.prefix)} characters before the cursor "
        f"line, {len(s.suffix)} after; {len(results[next(iter(results))].latencies)} keystrokes "
        f"of {s.line.strip()!r}; n_predict {args.n_predict}, greedy, ignore_eos"
    )
    print(f"# llama-server: -t/-tb {args.threads} -c 4096 -np 1 {' '.join(LLAMA_FLAGS)}\n")
    print(
        "| server | warm-up s | p50 s per keystroke | p95 s | prompt tokens evaluated per "
        "keystroke (median) | tokens generated (median) | tokens per decode step | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        step = f"{statistics.mean(r.per_step):.2f}" if r.per_step else "-"
        print(
            f"| {name} | {r.warmup_s:.2f} | {statistics.median(r.latencies):.2f} | "
            f"{pct(r.latencies, 0.95):.2f} | {statistics.median(r.evaluated):.0f} | "
            f"{statistics.median(r.generated):.0f} | {step} | {r.rss / 2**30:.2f} |"
        )
    lines = []
    for layout in ("psm", "spm"):
        ours, theirs = results.get(f"ours-{layout}"), results.get(f"llama-{layout}")
        if ours and theirs:
            x = statistics.median(ours.latencies) / statistics.median(theirs.latencies)
            lines.append(
                f"- {layout}: our p50 is {x:.2f}x llama-server's: target <= 0.5x "
                f"{'met' if x <= 0.5 else 'NOT met'}"
            )
    notes = sorted(set().union(*(r.notes for r in results.values())))
    print("\n" + "\n".join(lines + [f"- note: {n}" for n in notes]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--type", default="q4_0", choices=TYPES, help="GGUF type (q4_0)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"of {', '.join(SERVERS)}")
    parser.add_argument("--keystrokes", type=int, default=16, help="characters typed (16)")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", type=int, default=3000, help="characters before the cursor")
    parser.add_argument("--after", type=int, default=1000, help="characters after the cursor")
    parser.add_argument("--cache", type=Path, default=None, help="bench_llamacpp.py's cache")
    parser.add_argument("--model", type=Path, default=None, help="another GGUF instead (--type)")
    parser.add_argument("--json", type=Path, default=None, help="also write every request here")
    args = parser.parse_args()
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SERVERS]:
        sys.exit(f"--servers: unknown {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if any(n.startswith("llama") for n in names):
        llamacpp.require_tools("llama-server")
    cache = (args.cache or default_cache()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    model = args.model or gguf_file(cache, args.type)
    s = session(args.before, args.after)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-editor-") as logs:
        for name in names:
            results[name] = run_server(name, model, s, args, Path(logs))
    if args.json:
        rows = {n: {**r.__dict__, "notes": sorted(r.notes)} for n, r in results.items()}
        args.json.write_text(json.dumps(rows, indent=1))
    report(results, args, s)


if __name__ == "__main__":
    main()
