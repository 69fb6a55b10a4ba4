"""TrainConfig: TOML sections, flag overrides, validation, and the `codegemma train` command line."""

from __future__ import annotations

import pytest

from codegemma.cli import build_parser
from codegemma.train.config import TrainConfig, TrainConfigError, load_train_config

TOML = """
[model]
preset = "tiny"
[data]
data = "shards/"
[batch]
max_steps = 20
micro_batch_size = 2
[optim]
lr = 1
[checkpoint]
run_dir = "runs/x"
"""


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_toml_sections_and_overrides(tmp_path):
    cfg = load_train_config(write(tmp_path, TOML), {"max_steps": 5, "compile": True})
    assert (cfg.preset, cfg.data, cfg.run_dir) == ("tiny", "shards/", "runs/x")
    assert cfg.max_steps == 5 and cfg.compile is True and cfg.micro_batch_size == 2
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # a TOML int where a float is expected
    # the resolved config round-trips through its own TOML
    again = load_train_config(write(tmp_path, cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (TOML + "lrr = 3\n", "unknown key 'lrr'"),
        (TOML.replace("[optim]\nlr = 1", "[system]\nlr = 1"), r"'lr' belongs in \[optim\]"),
        (TOML + "[optimizer]\nx = 1\n", r"unknown table \[optimizer\]"),
        (TOML.replace('preset = "tiny"', "preset = 3"), "preset must be str"),
        (TOML.replace("max_steps = 20", "max_steps = 0"), "max_steps must be an integer >= 1"),
        (TOML.replace('preset = "tiny"', 'init_from = "m"\npreset = "tiny"'), "exactly one"),
        (TOML + '[system]\nparallel = "tp"\n', "parallel must be one of ddp, fsdp"),
        (TOML + "[log]\nlog_every = 3\n", "ckpt_every .* multiple of log_every"),
        ("max_steps = 3\n" + TOML, "'max_steps' is set twice"),
        ("[model]\npreset = 'tiny'\n", "missing required setting.*--data.*--max-steps"),
        ("preset = ", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, match):
    with pytest.raises(TrainConfigError, match=match):
        load_train_config(write(tmp_path, text))


def test_sft_needs_seq_len():
    with pytest.raises(TrainConfigError, match="sft.*seq_len"):
        TrainConfig(run_dir="r", preset="tiny", data="c.jsonl", max_steps=1, task="sft")


def test_cli_train_and_plot_parse(tmp_path, capsys):
    parser = build_parser()
    cfg = write(tmp_path, TOML)
    args = parser.parse_args(
        ["train", "--config", str(cfg), "--lr", "0.01", "--no-progress", "--print-config"]
    )
    assert args.train_action is None
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "lr = 0.01" in printed and "progress = false" in printed
    args = parser.parse_args(["train", "plot", "runs/x", "--out", "a.png"])
    assert (args.train_action, args.run_dir, args.out) == ("plot", "runs/x", "a.png")


def test_cli_bad_override_type_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--max-steps", "ten"])


def test_docs_list_every_setting_and_their_example_parses(tmp_path):
    import re
    from pathlib import Path

    from codegemma.train.config import FIELDS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.M))
    assert documented == set(FIELDS)
    example = re.search(r"```toml\n(\[model\]\npreset.*?)```", doc, flags=re.S).group(1)
    cfg = load_train_config(write(tmp_path, example))
    assert (cfg.preset, cfg.max_steps, cfg.eval_holdout) == ("tiny", 2000, 64)
