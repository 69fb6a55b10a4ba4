"""`codegemma data`: flags take their defaults from the config dataclasses (never restated),
set only what they name, and every user error is a raised `CodegemmaError` that the one
top-level handler prints; the executors' user errors and their orphan check."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from codegemma.cli import main
from codegemma.data import cli as data_cli
from codegemma.data.decontaminate import DecontamConfig
from codegemma.data.dedup import DedupConfig
from codegemma.data.executors import LocalExecutor, _indexed, get_executor
from codegemma.data.fim import FimConfig
from codegemma.data.pii import PiiConfig
from codegemma.data.pipeline import PrepareConfig
from codegemma.data.shards import write_token_dataset
from codegemma.data.sources import SourceConfig
from codegemma.errors import DataPipelineError, ShardError, UsageError


def _prepare_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    data_cli.register(root.add_subparsers())
    (data,) = root._subparsers._group_actions[0].choices.values()
    return data._subparsers._group_actions[0].choices["prepare"]


def _args(*flags: str) -> argparse.Namespace:
    return _prepare_parser().parse_args(["src", "--out", "o", "--tokenizer", "tok", *flags])


def test_defaults_and_their_help_come_from_the_dataclasses() -> None:
    assert data_cli.build_config(_args()) == PrepareConfig(tokenizer="tok")
    actions = {a.option_strings[0]: a for a in _prepare_parser()._actions if a.option_strings}
    prepare, fim = PrepareConfig(tokenizer="tok"), FimConfig()
    expected = {
        "--seq-len": prepare.seq_len,
        "--seed": prepare.seed,
        "--shards": prepare.num_shards,
        "--fim-rate": fim.rate,
        "--spm-rate": fim.spm_rate,
        "--syntax-rate": fim.syntax_rate,
    }
    for flag, value in expected.items():
        assert actions[flag].default is argparse.SUPPRESS, flag  # unset: the dataclass decides
        assert actions[flag].help.endswith(f"(default: {value})"), (flag, actions[flag].help)


def test_flags_set_only_what_they_name() -> None:
    args = _args(
        *("--seq-len", "128", "--shards", "2", "--seed", "7", "--fim-rate", "0.5"),
        *("--languages", "python, go", "--mbpp", "mbpp.jsonl", "--no-pii"),
    )
    assert data_cli.build_config(args) == PrepareConfig(
        tokenizer="tok",
        seq_len=128,
        num_shards=2,
        seed=7,
        fim=FimConfig(rate=0.5),
        sources=SourceConfig(languages=("python", "go")),
        decontam=DecontamConfig(mbpp_path="mbpp.jsonl"),
        pii=PiiConfig(emails=False, ips=False, secrets=False),
    )
    off = data_cli.build_config(_args("--no-dedup", "--no-decontam"))
    assert off.dedup == DedupConfig(exact=False, near=False)
    assert off.decontam == DecontamConfig(enabled=False) and off.pii == PiiConfig()


def test_bad_option_values_raise_usage_errors_printed_once(tmp_path, capsys) -> None:
    with pytest.raises(UsageError, match=r"seq_len \(--seq-len\) must be at least 2"):
        data_cli.prepare_command(_args("--seq-len", "1"))
    with pytest.raises(UsageError, match=r"--shards\) must be at least 1"):
        data_cli.build_config(_args("--shards", "0"))
    argv = ["data", "prepare", str(tmp_path), "--out", str(tmp_path / "o"), "--tokenizer", "t"]
    assert main([*argv, "--seq-len", "1"]) == 2
    assert (
        "codegemma data: error: seq_len (--seq-len) must be at least 2" in capsys.readouterr().err
    )
    with pytest.raises(UsageError, match="--workers must be at least 1"):
        LocalExecutor(0)
    with pytest.raises(UsageError, match="unknown engine 'spark'; use one of local, ray"):
        get_executor("spark")
    with pytest.raises(UsageError, match="dedup threshold"):
        DedupConfig(threshold=1.5)


def test_inspect_errors_are_raised_with_a_fix(
    tiny_tokenizer, tiny_sp_tokenizer_dir, tmp_path, capsys
) -> None:
    out = write_token_dataset(tmp_path / "ds", list(range(40)), tiny_tokenizer, seq_len=8)
    args = argparse.Namespace(
        dir=str(out), n=1, tokenizer=str(tiny_sp_tokenizer_dir), color="never"
    )
    with pytest.raises(ShardError, match="is not the one the shards") as e:
        data_cli.inspect_command(args)
    assert "--tokenizer" in e.value.fix
    assert main(["data", "inspect", str(out), "--tokenizer", str(tiny_sp_tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codegemma data: error: tokenizer ") and "fix: pass that tokenizer" in err
    with pytest.raises(UsageError, match="--n must be 0 or more"):
        data_cli.inspect_command(argparse.Namespace(**{**vars(args), "n": -1}))
    assert main(["data", "inspect", str(out), "--n", "1", "--color", "never"]) == 0


def test_missing_ray_is_a_data_pipeline_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(DataPipelineError, match="needs Ray Data") as e:
        get_executor("ray", 2)
    assert "--engine local" in e.value.fix


def test_a_worker_whose_parent_is_gone_runs_no_job(tmp_path) -> None:
    ran = tmp_path / "ran"

    def job(_job, i):
        ran.write_text(str(i))
        return {}

    pid = os.fork()
    if pid == 0:  # as if orphaned: its parent is not the process that started the pool
        try:
            _indexed(job, None, os.getppid() + 1, 0)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1 and not ran.exists()
    assert _indexed(job, None, os.getppid(), 3) == (3, {}) and ran.read_text() == "3"


def test_summary_gives_the_dedup_cluster_count_its_heading() -> None:
    from codegemma.data.report import summary

    manifest = {
        "num_sequences": 1,
        "seq_len": 16,
        "num_tokens": 16,
        "dtype": "uint16",
        "shards": [{}],
        "tokenizer": {"fingerprint": "f" * 16, "vocab_size": 512},
        "stats": {"sources": {"skipped.symlink": 1}, "dedup": {"documents": 2, "kept": 2}},
    }
    lines = summary(manifest)
    at = lines.index("  near-duplicate clusters: 0")
    assert lines[at - 1] == "\ndedup: nothing dropped"
