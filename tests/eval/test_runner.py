"""The runner's plumbing with stand-in generators (no model): outputs, post-processing,
resumability, pass@k over several samples, scoring foreign samples, the report and the CLI."""

import argparse
import dataclasses
import json
import types

import pytest

from codegemma.eval import cli as eval_cli
from codegemma.eval.passk import pass_at_k
from codegemma.eval.report import PUBLISHED_INFILLING, report
from codegemma.eval.runner import (
    HUMANEVAL_STOP,
    RunConfig,
    read_samples,
    run_eval,
    score_samples,
    stop_output,
)
from codegemma.eval.sandbox import namespaces_available
from codegemma.eval.tasks import load_taskset


class CanonicalGenerator:
    """Answers every prompt with the task's canonical solution plus text a stop must cut."""

    def __init__(self, tasks):
        self.by_prompt = {t.prompt: t for t in tasks}
        self.by_pair = {(t.prompt, t.suffix): t for t in tasks}
        self.asked = 0

    def generate(self, prompts, *, stop, max_new_tokens, temperature, top_p, seed):
        self.asked += len(prompts)
        out = []
        for p in prompts:
            t = self.by_prompt[p]
            tail = "\n[DONE]\nYou are an expert" if t.kind == "mbpp" else "\ndef junk(:\n"
            out.append(t.canonical_solution + tail)
        return out

    def infill(self, pairs, *, stop, max_new_tokens, temperature, top_p, seed):
        self.asked += len(pairs)
        return [self.by_pair[p].canonical_solution for p in pairs]


class AlternatingGenerator(CanonicalGenerator):
    """Right on even calls, wrong on odd ones: known pass counts for pass@k."""

    def generate(self, prompts, **kw):
        right = super().generate(prompts, **kw)
        return [
            r if (self.asked - len(prompts) + i) % 2 == 0 else "    return None\n"
            for i, r in enumerate(right)
        ]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_samples_results_summary_and_resumes(tmp_path):
    tasks = load_taskset("humaneval", limit=6)
    gen = CanonicalGenerator(tasks)
    cfg = RunConfig(taskset="humaneval", model="canonical-stand-in", limit=6, batch_size=4)
    summary = run_eval(cfg, gen, tmp_path, progress=False)
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["num_tasks"] == 6
    assert summary["isolation"] == ("full" if namespaces_available() else summary["isolation"])
    samples = rows(tmp_path / "samples.jsonl")
    assert len(samples) == 6 and all("junk" not in s["completion"] for s in samples)
    assert all("junk" in s["raw"] for s in samples)
    assert len(rows(tmp_path / "results.jsonl")) == 6
    assert json.loads((tmp_path / "summary.json").read_text())["passed_samples"] == 6
    # rerun: nothing regenerated, nothing re-executed
    before = (tmp_path / "results.jsonl").read_text()
    gen.asked = 0
    assert run_eval(cfg, gen, tmp_path, progress=False)["pass_at_k"] == {"pass@1": 1.0}
    assert gen.asked == 0 and (tmp_path / "results.jsonl").read_text() == before


def test_interrupted_run_finishes_only_what_is_missing(tmp_path):
    tasks = load_taskset("humaneval", limit=5)
    cfg = RunConfig(taskset="humaneval", model="canonical-stand-in", limit=5, batch_size=2)
    run_eval(cfg, CanonicalGenerator(tasks), tmp_path, progress=False)
    # simulate a crash: two samples never generated, one result never written, a torn last line
    s = (tmp_path / "samples.jsonl").read_text().splitlines(True)
    (tmp_path / "samples.jsonl").write_text("".join(s[:3]))
    r = (tmp_path / "results.jsonl").read_text().splitlines(True)
    (tmp_path / "results.jsonl").write_text("".join(r[:2]) + r[2][:20])
    gen = CanonicalGenerator(tasks)
    summary = run_eval(cfg, gen, tmp_path, progress=False)
    assert gen.asked == 2
    assert summary["num_samples"] == 5 and summary["pass_at_k"]["pass@1"] == 1.0


def test_resume_with_other_settings_is_refused(tmp_path):
    tasks = load_taskset("humaneval", limit=2)
    run_eval(
        RunConfig(taskset="humaneval", model="a", limit=2),
        CanonicalGenerator(tasks),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        run_eval(
            RunConfig(taskset="humaneval", model="a", limit=2, max_new_tokens=64),
            CanonicalGenerator(tasks),
            tmp_path,
            progress=False,
        )


def test_several_samples_give_unbiased_pass_at_k(tmp_path):
    tasks = load_taskset("humaneval", limit=4)
    cfg = RunConfig(
        taskset="humaneval",
        model="alternating-stand-in",
        limit=4,
        n=4,
        ks=(1, 2, 10),
        temperature=0.8,
        batch_size=3,
    )
    summary = run_eval(cfg, AlternatingGenerator(tasks), tmp_path, progress=False)
    results = rows(tmp_path / "results.jsonl")
    per_task = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}  # k=10 > n=4 is not reported
    expected = sum(pass_at_k(4, sum(v), 2) for v in per_task.values()) / 4
    assert summary["pass_at_k"]["pass@2"] == pytest.approx(expected)
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(0.5)


def test_infilling_and_mbpp_runs(tmp_path, mbpp_file):
    tasks = load_taskset("humaneval-single-line", limit=8)
    s = run_eval(
        RunConfig(taskset="humaneval-single-line", model="x", limit=8),
        CanonicalGenerator(tasks),
        tmp_path / "sl",
        progress=False,
    )
    assert s["pass_at_k"]["pass@1"] == 1.0
    mb = load_taskset("mbpp", data=mbpp_file)
    s = run_eval(
        RunConfig(taskset="mbpp", model="x", data=str(mbpp_file)),
        CanonicalGenerator(mb),
        tmp_path / "mbpp",
        progress=False,
    )
    assert s["pass_at_k"]["pass@1"] == 1.0 and s["num_tasks"] == 4


def test_stop_output_per_task_type(mbpp_file):
    he = load_taskset("humaneval", limit=1)[0]
    for stop in HUMANEVAL_STOP:
        assert stop_output(he, "    return 1" + stop + "tail") == "    return 1"
    sl = load_taskset("humaneval-single-line", limit=1)[0]
    assert stop_output(sl, "    x = 1\n    y = 2\n") == "    x = 1\n"
    assert stop_output(sl, "    x = 1") == "    x = 1\n"
    ml = load_taskset("humaneval-multi-line", limit=1)[0]
    assert stop_output(ml, "a\nb\n") == "a\nb\n"
    mb = load_taskset("mbpp", data=mbpp_file)[0]
    assert stop_output(mb, "def f():\n  return 1\n[DONE]\nmore") == "def f():\n  return 1\n"


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="temperature"):
        RunConfig(taskset="humaneval", model="m", n=5)
    with pytest.raises(ValueError, match="--n"):
        RunConfig(taskset="humaneval", model="m", n=0)


def test_score_foreign_samples_and_report(tmp_path):
    tasks = load_taskset("humaneval-single-line", limit=4)
    samples = tmp_path / "samples.jsonl"
    lines = [{"task_id": t.task_id, "completion": t.canonical_solution} for t in tasks]
    lines += [{"task_id": t.task_id, "completion": ""} for t in tasks]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sorted(read_samples(samples))[:2] == [(tasks[0].task_id, 0), (tasks[0].task_id, 1)]
    summary = score_samples(
        "humaneval-single-line", samples, tmp_path / "scored", ks=(1, 2), limit=4, progress=False
    )
    assert summary["samples_per_task"] == 2
    assert summary["pass_at_k"]["pass@2"] == 1.0
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(0.5)
    table = report([tmp_path / "scored"])
    assert "| humaneval-single-line pass@1 |" in table.replace("| model | ", "| ")
    assert "50.00%" in table and "78.41%" in table and "543" in table
    assert len([line for line in table.splitlines() if "(published)" in line]) == len(
        PUBLISHED_INFILLING
    )
    # a changed completion is re-executed, an unchanged one is not
    lines[0]["completion"] = ""
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    again = score_samples(
        "humaneval-single-line", samples, tmp_path / "scored", ks=(1,), limit=4, progress=False
    )
    assert again["passed_samples"] == summary["passed_samples"] - 1


def test_score_rejects_unknown_task_ids(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/9999", "completion": ""}\n')
    with pytest.raises(ValueError, match="not in humaneval"):
        score_samples("humaneval", samples, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="summary.json not found"):
        report([tmp_path])


def parse(argv):
    parser = argparse.ArgumentParser(prog="codegemma")
    eval_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_export_score_report(tmp_path, capsys):
    out = tmp_path / "sl.jsonl"
    args = parse(["eval", "export", "humaneval-single-line", str(out), "--limit", "3"])
    assert args.func(args) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": r["task_id"], "completion": r["canonical_solution"]}) + "\n"
            for r in exported
        )
    )
    args = parse(
        ["eval", "score", "humaneval-single-line", str(samples), "--limit", "3", "--quiet"]
    )
    assert args.func(args) == 0
    assert "pass@1 100.00%" in capsys.readouterr().out
    args = parse(["eval", "report", str(tmp_path / "samples-scored")])
    assert args.func(args) == 0
    assert "100.00%" in capsys.readouterr().out


def test_cli_run_uses_the_loaded_model(tmp_path, monkeypatch, capsys):
    import codegemma

    tasks = load_taskset("humaneval", limit=2)
    canon = CanonicalGenerator(tasks)
    seen = {}

    class FakeLoaded:  # stands in for codegemma.load(...): generate_batch like the real API
        tokenizer = codegemma.load().tokenizer  # the bundled model's: prompts are measured
        engine = types.SimpleNamespace(max_seq_len=8192)

        def generate_batch(self, prompts, *, stop, max_new_tokens, temperature, top_p, seed):
            seen.update(stop=stop, max_new_tokens=max_new_tokens)
            return canon.generate(
                prompts,
                stop=stop,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )

    monkeypatch.setattr(codegemma, "load", lambda *a, **k: FakeLoaded())
    args = parse(
        [
            "eval",
            "run",
            "humaneval",
            "--model",
            "some/dir/cg-2b",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    assert "pass@1 100.00%" in capsys.readouterr().out
    assert seen == {"stop": list(HUMANEVAL_STOP), "max_new_tokens": 512}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == "cg-2b"


def test_end_to_end_with_a_real_tiny_model(tmp_path):
    """The real path: codegemma.load, FIM prompts from prompts.py, the engine, the sandbox.
    A random tiny model scores ~0; what is checked is that every stage ran and was recorded."""
    import torch

    import codegemma
    from codegemma.checkpoint import save_model
    from codegemma.config import ModelConfig
    from codegemma.eval.runner import CodeGemmaGenerator
    from codegemma.model import GemmaForCausalLM
    from codegemma.train.tokenizer_trainer import train_tokenizer

    model_dir = tmp_path / "tiny"
    train_tokenizer(
        [t.prompt + t.canonical_solution for t in load_taskset("humaneval")], 512, model_dir
    )
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny")
    save_model(GemmaForCausalLM(config), config, model_dir)
    gen = CodeGemmaGenerator(codegemma.load(model_dir, device="cpu"))
    for name in ("humaneval-single-line", "humaneval"):
        cfg = RunConfig(taskset=name, model="tiny-random", limit=3, max_new_tokens=8, batch_size=3)
        summary = run_eval(cfg, gen, tmp_path / name, progress=False)
        assert summary["num_samples"] == 3 and set(summary["pass_at_k"]) == {"pass@1"}
        assert sum(summary["results"].values()) == 3
        assert summary["generation_seconds"] > 0


def test_a_prompt_longer_than_the_context_is_truncated_from_the_left_and_counted(tmp_path):
    """A small model's context can be shorter than a prompt (MBPP with its tests): the generator
    keeps BOS and the prompt's end, generates, and the run's summary says how many it cut."""
    import torch

    import codegemma
    from codegemma.checkpoint import save_model
    from codegemma.config import ModelConfig
    from codegemma.eval.runner import CodeGemmaGenerator
    from codegemma.model import GemmaForCausalLM
    from codegemma.train.tokenizer_trainer import train_tokenizer

    model_dir = tmp_path / "tiny"
    tasks = load_taskset("humaneval")
    train_tokenizer([t.prompt + t.canonical_solution for t in tasks], 512, model_dir)
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.preset("tiny"), max_position_embeddings=64)
    save_model(GemmaForCausalLM(config), config, model_dir)
    gen = CodeGemmaGenerator(codegemma.load(model_dir, device="cpu"))
    long_prompt = tasks[0].prompt * 3
    ids = gen.cg.tokenizer.encode(long_prompt, bos=True)
    assert len(ids) > 64
    (out,) = gen.generate(
        [long_prompt], stop=[], max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0
    )
    assert isinstance(out, str) and gen.truncated_prompts == 1
    fitted = gen._fit(long_prompt, 8)
    assert gen._fit(tasks[0].prompt[:40], 8) == tasks[0].prompt[:40]  # fits: as it is
    assert len(fitted) == 56 and fitted[0] == ids[0] and fitted[1:] == ids[-55:]
    cfg = RunConfig(taskset="humaneval", model="tiny-64", limit=2, max_new_tokens=8, batch_size=2)
    summary = run_eval(cfg, CodeGemmaGenerator(gen.cg), tmp_path / "run", progress=False)
    assert summary["truncated_prompts"] == 2 and summary["num_samples"] == 2
    assert "2 prompt(s) cut from the left to fit the context" in report([tmp_path / "run"])


def test_every_kth_task_is_a_recorded_deterministic_subset(tmp_path):
    cfg = RunConfig(taskset="humaneval", model="canonical-stand-in", limit=9, every=4)
    tasks = load_taskset("humaneval", None, 9)
    summary = run_eval(cfg, CanonicalGenerator(tasks), tmp_path, progress=False)
    assert summary["num_tasks"] == 3  # tasks 0, 4, 8
    assert {r["task_id"] for r in read_samples(tmp_path / "samples.jsonl").values()} == {
        "HumanEval/0",
        "HumanEval/4",
        "HumanEval/8",
    }
    assert "every 4th task" in report([tmp_path])
    with pytest.raises(ValueError, match="--every"):
        RunConfig(taskset="humaneval", model="m", every=0)


def test_task_sets_carry_their_defaults_and_runs_record_them(tmp_path):
    from codegemma.eval.tasks import TASKSETS

    bc_sets = {name: s for name, s in TASKSETS.items() if name.startswith("bc-")}
    assert len(bc_sets) == 16 and {s.max_new_tokens for s in bc_sets.values()} == {512}
    assert (bc_sets["bc-humaneval-java"].timeout_s, bc_sets["bc-mbpp-cpp"].timeout_s) == (15, 10)
    assert TASKSETS["mbpp"].timeout_s == 10.0
    others = {name: s for name, s in TASKSETS.items() if name not in bc_sets}
    assert {name: s.max_new_tokens for name, s in others.items()} == {
        "humaneval": 512,
        "humaneval-single-line": 128,
        "humaneval-multi-line": 128,
        "humaneval-random-span": 128,
        "humaneval-random-span-light": 128,
        "mbpp": 512,
        "mbpp-0shot": 512,
        "mbpp-sanitized": 512,
        "mbpp-sanitized-0shot": 512,
    }
    cfg = RunConfig(taskset="humaneval-single-line", model="x", limit=2)
    assert (cfg.max_new_tokens, cfg.timeout_s) == (128, 3.0)
    assert RunConfig(taskset="humaneval", model="x", max_new_tokens=7).max_new_tokens == 7
    tasks = load_taskset("humaneval-single-line", limit=2)
    summary = run_eval(cfg, CanonicalGenerator(tasks), tmp_path, progress=False)
    assert (summary["max_new_tokens"], summary["timeout_s"]) == (128, 3.0)
    assert summary["config"]["max_new_tokens"] == 128


def test_cli_run_takes_the_task_sets_budget(tmp_path, monkeypatch):
    import codegemma

    tasks = load_taskset("humaneval-single-line", limit=2)
    canon = CanonicalGenerator(tasks)
    seen = {}

    class FakeLoaded:
        tokenizer = None

        def generate_batch(self, prompts, *, stop, max_new_tokens, temperature, top_p, seed):
            seen["max_new_tokens"] = max_new_tokens
            return [canon.by_pair[p].canonical_solution for p in prompts]

    monkeypatch.setattr(codegemma, "load", lambda *a, **k: FakeLoaded())
    monkeypatch.setattr("codegemma.prompts.fim_prompt", lambda tok, p, s: (p, s))
    args = parse(
        ["eval", "run", "humaneval-single-line", "--limit", "2", "--out", str(tmp_path), "--quiet"]
    )
    assert args.func(args) == 0
    assert seen == {"max_new_tokens": 128}
    args = parse(["eval", "run", "humaneval", "--dtype", "bfloat16", "--device", "cpu"])
    assert (args.dtype, args.device, args.max_new_tokens, args.timeout) == (
        "bfloat16",
        "cpu",
        None,
        None,
    )


def test_results_are_counted_by_typed_outcome(tmp_path):
    tasks = load_taskset("humaneval", limit=3)
    samples = tmp_path / "samples.jsonl"
    completions = [
        tasks[0].canonical_solution,
        "    return None\n",  # an assertion fails
        "    import os\n    os._exit(0)\n",  # leaves before the tests finish
    ]
    samples.write_text(
        "".join(
            json.dumps({"task_id": t.task_id, "completion": c}) + "\n"
            for t, c in zip(tasks, completions, strict=True)
        )
    )
    summary = score_samples("humaneval", samples, tmp_path / "scored", limit=3, progress=False)
    assert summary["results"] == {
        "passed": 1,
        "failed: AssertionError": 1,
        "exited early: exit code 0": 1,
    }
    assert summary["timeout_s"] == 3.0
    rows = {r["task_id"]: r for r in rows_of(tmp_path / "scored" / "results.jsonl")}
    first = rows[tasks[0].task_id]
    assert (first["passed"], first["result"], first["outcome"]) == (True, "passed", "passed")
    third = rows[tasks[2].task_id]
    assert third["passed"] is False
    assert third["result"] == "failed: exited before the tests finished (exit code 0)"
    assert (third["outcome"], third["kind"]) == ("exited early", "exit code 0")


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_task_sets_and_samples_files_raise_eval_error(tmp_path):
    from codegemma.errors import EvalError

    with pytest.raises(EvalError, match="unknown task set"):
        RunConfig(taskset="humaneval-x", model="m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": ""}\nnot json\n')
    with pytest.raises(EvalError, match="bad.jsonl:2: not a JSON object"):
        read_samples(bad)
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(EvalError, match="needs task_id and completion"):
        read_samples(bad)
    bad.write_text('{"task_id": "HumanEval/9999", "completion": ""}\n')
    with pytest.raises(EvalError, match="not in humaneval"):
        score_samples("humaneval", bad, tmp_path / "o", progress=False)


def test_sample_keys_are_typed_and_behave_as_pairs(tmp_path):
    from codegemma.eval.runner import SampleKey

    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/1", "completion": "x", "sample_idx": 3}\n')
    (key,) = read_samples(samples)
    assert isinstance(key, SampleKey) and (key.task_id, key.index) == ("HumanEval/1", 3)
    assert key == ("HumanEval/1", 3)
