"""`codegemma data inspect`: what a prepared directory holds, as text.

Decoded sample sequences with the FIM sentinels, file separators, bos and eos highlighted (ANSI
colours on a terminal, `[[name]]` brackets otherwise), then the statistics the manifest carries:
files by language, drops by stage and reason, dedup clusters, PII counts, the FIM level and
PSM/SPM/plain shares (of rows or files), rows holding a whole FIM example and FIM examples per
million tokens, packing and tokens. Plain text, no dependencies, so it works in CI logs.

    print(render(open_shards("out"), Tokenizer.load("tok"), n=3, color=False))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from codegemma.data.shards import ShardDataset

_STYLE = {
    "bos": "1;32",
    "eos": "1;31",
    "fim_prefix": "1;35",
    "fim_suffix": "1;36",
    "fim_middle": "1;33",
    "file_separator": "1;34",
    "pad": "2",
}


def special_names(tok: Any) -> dict[int, str]:
    sp = tok.special
    names = {}
    for name in ("pad", "eos", "bos", "fim_prefix", "fim_middle", "fim_suffix", "file_separator"):
        value = getattr(sp, name, None)
        if value is not None:
            names[int(value)] = name
    return names


def highlight(tok: Any, ids: np.ndarray | list[int], *, color: bool) -> str:
    """Decode `ids`, replacing each special token by a visible marker."""
    names = special_names(tok)
    out, run = [], []
    for i in (int(x) for x in ids):
        if i in names:
            if run:
                out.append(tok.decode(run))
                run = []
            name = names[i]
            out.append(f"\x1b[{_STYLE[name]}m<{name}>\x1b[0m" if color else f"[[{name}]]")
        else:
            run.append(i)
    if run:
        out.append(tok.decode(run))
    return "".join(out)


def _section(title: str, counts: dict[str, int], total: int | None = None) -> list[str]:
    if not counts:
        return []
    lines = [f"\n{title}"]
    width = max(len(k) for k in counts)
    for k, v in counts.items():
        share = f"  {100 * v / total:5.1f}%" if total else ""
        lines.append(f"  {k:<{width}}  {v:>12,}{share}")
    return lines


def summary(manifest: dict[str, Any]) -> list[str]:
    st = manifest.get("stats", {})
    lines = [
        f"sequences {manifest['num_sequences']:,} x seq_len {manifest['seq_len']} "
        f"= {manifest['num_tokens']:,} tokens ({manifest['dtype']}, {len(manifest['shards'])} shards)",
        f"tokenizer {manifest['tokenizer']['fingerprint'][:16]} "
        f"(vocab {manifest['tokenizer']['vocab_size']})",
    ]
    files = st.get("language_files", {})
    lb = st.get("language_bytes", {})
    lines += _section(
        "files by language (kept)",
        {f"{k} ({lb.get(k, 0):,} bytes)": v for k, v in files.items()},
        sum(files.values()),
    )
    for stage in ("sources", "filters", "dedup", "decontaminate"):
        counts = st.get(stage, {})
        drops = {k: v for k, v in counts.items() if k.startswith(("dropped.", "skipped."))}
        lines += _section(f"{stage}: dropped by reason", drops)
        if stage == "dedup" and counts:
            if not drops:  # the cluster count still needs its heading
                lines.append("\ndedup: nothing dropped")
            lines.append(f"  near-duplicate clusters: {counts.get('near_clusters', 0)}")
    for cluster in manifest.get("dedup_clusters", [])[:5]:
        lines.append(
            f"    keep {cluster[0]}  <- {', '.join(cluster[1:4])}"
            f"{' ...' if len(cluster) > 4 else ''}"
        )
    lines += _section("PII redacted", st.get("pii", {}))
    lines += _fim_section(manifest)
    lines += _section("repository packing", st.get("packing", {}))
    lines += _section("tokens", st.get("tokens", {}))
    return lines


def fim_level(manifest: dict[str, Any]) -> str:
    """The level FIM was applied at; manifests from before the setting existed are document's."""
    return manifest.get("fim_level") or manifest.get("config", {}).get("fim", {}).get(
        "fim_level", "document"
    )


def _fim_section(manifest: dict[str, Any]) -> list[str]:
    fim = manifest.get("stats", {}).get("fim", {})
    level = fim_level(manifest)
    unit = "rows" if level == "context" else "files"
    lines = [f"\nFIM level: {level} (FIM applied per {unit[:-1]})"]
    lines += _section(
        f"FIM layout (share of {unit})",
        {k: fim.get(k, 0) for k in ("psm", "spm", "plain")},
        fim.get(unit, 0),
    )
    lines += _section(
        "FIM split modes",
        {k: v for k, v in fim.items() if k.startswith(("split_", "syntax_fallback", "context_"))},
    )
    rows = manifest.get("stats", {}).get("rows", {})
    if rows:
        lines += _section(
            "rows with FIM (a whole prefix/suffix/middle in the row; broken: sentinels without)",
            {"fim": rows.get("fim", 0), "fim_broken": rows.get("fim_broken", 0)},
            rows.get("rows", 0),
        )
        per_million = 1e6 * rows.get("fim_examples", 0) / max(manifest.get("num_tokens", 0), 1)
        lines.append(
            f"  whole FIM examples: {rows.get('fim_examples', 0):,} "
            f"({per_million:,.0f} per million tokens)"
        )
    return lines


def render(
    ds: ShardDataset, tok: Any, *, n: int = 3, color: bool = False, width: int = 1200
) -> str:
    """The inspect report: `n` evenly spaced samples, then the summary."""
    lines = [f"{ds.dir}"]
    picks = sorted({int(i) for i in np.linspace(0, len(ds) - 1, num=n)}) if len(ds) and n else []
    for i in picks:
        text = highlight(tok, ds[i], color=color)
        if len(text) > width:
            text = text[:width] + f" ... [{len(text) - width} more chars]"
        lines += [f"\n--- sequence {i} of {len(ds)} ---", text]
    lines += summary(ds.manifest)
    return "\n".join(lines)
