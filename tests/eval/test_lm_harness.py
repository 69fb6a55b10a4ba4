"""The lm-eval adapter (`codegemma.eval.lm_harness`) against lm-eval's own `hf` model.

Both run the same three local tasks (tests/eval/data/lm_tasks: multiple choice with few-shot
contexts, generation with a regex answer, rolling perplexity over a document longer than the
model's context) on the same random-weight tiny checkpoint, which transformers loads too. Every
request's answer must agree: log-likelihoods within 1e-4 (fp32) with the same greedy flags,
identical generations, equal rolling sums, and so the same metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
from pathlib import Path

import pytest
import torch

lm_harness = pytest.importorskip("codegemma.eval.lm_harness")
import lm_eval  # noqa: E402  (lm_harness switches Hugging Face libraries offline first)

from codegemma.errors import EvalError  # noqa: E402
from codegemma.eval import lm_eval_cli  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "lm_tasks"
TASKS = ["codegemma_test_mc", "codegemma_test_gen", "codegemma_test_ppl"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(our run, hf's results) on the local tasks; data paths in the YAMLs are relative to the
    task directory, so both run from there."""
    from lm_eval.models.huggingface import HFLM

    out = tmp_path_factory.mktemp("lm_eval_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASK_DIR)
        ours = lm_harness.run_lm_eval(
            str(tiny_model_dir),
            ",".join(TASKS),
            include_path=TASK_DIR,
            out_dir=out,
            batch_size=4,
            dtype="float32",
            device="cpu",
            bootstrap_iters=0,
        )
        hf = HFLM(
            pretrained=str(tiny_model_dir),
            device="cpu",
            dtype="float32",
            batch_size=4,
            add_bos_token=True,
        )
        theirs = lm_eval.simple_evaluate(
            hf,
            tasks=TASKS,
            task_manager=lm_eval.tasks.TaskManager(include_path=TASK_DIR, include_defaults=False),
            bootstrap_iters=0,
            log_samples=True,
        )
    return ours, theirs


def _samples(run, task: str) -> list[dict]:
    path = run.out_dir / f"samples_{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs(ours, theirs, task: str):
    mine, hf = _samples(ours, task), theirs["samples"][task]
    assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in hf]
    assert len(mine) > 0
    return list(zip(mine, hf, strict=True))


def test_loglikelihoods_match_hf(runs) -> None:
    ours, theirs = runs
    requests = 0
    for mine, hf in _pairs(ours, theirs, "codegemma_test_mc"):
        assert mine["arguments"] == [list(a) for a in hf["arguments"]]  # same prompts
        for (ll, greedy), (hf_ll, hf_greedy) in zip(
            [r[0] for r in mine["resps"]], [r[0] for r in hf["resps"]], strict=True
        ):
            assert abs(ll - hf_ll) <= 1e-4, (mine["doc_id"], ll, hf_ll)
            assert greedy == hf_greedy
            requests += 1
    assert requests == 14 * 4
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            ours.results["results"]["codegemma_test_mc"][metric]
            == theirs["results"]["codegemma_test_mc"][metric]
        )


def test_generations_match_hf(runs) -> None:
    ours, theirs = runs
    for mine, hf in _pairs(ours, theirs, "codegemma_test_gen"):
        assert mine["resps"] == hf["resps"]
        assert mine["filtered_resps"] == hf["filtered_resps"]
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert (
            ours.results["results"]["codegemma_test_gen"][metric]
            == theirs["results"]["codegemma_test_gen"][metric]
        )


def test_rolling_loglikelihood_matches_hf(runs, tiny_model_dir: Path) -> None:
    ours, theirs = runs
    for mine, hf in _pairs(ours, theirs, "codegemma_test_ppl"):
        (total,), (hf_total,) = mine["resps"][0], hf["resps"][0]
        # a sum over up to ~1600 tokens: fp32 rounding of the sum, not of any one token
        assert math.isclose(total, hf_total, rel_tol=1e-6, abs_tol=1e-4), (total, hf_total)
    # the long document spans several of the tiny model's windows
    from codegemma.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_model_dir)
    longest = max(
        len(tokenizer.encode(s["doc"]["text"])) for s in _samples(ours, "codegemma_test_ppl")
    )
    window = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert longest > 2 * window
    ppl = ours.results["results"]["codegemma_test_ppl"]["byte_perplexity,none"]
    assert math.isclose(
        ppl, theirs["results"]["codegemma_test_ppl"]["byte_perplexity,none"], rel_tol=1e-5
    )


def test_results_written(runs) -> None:
    ours, _ = runs
    saved = json.loads((ours.out_dir / "results.json").read_text())
    assert set(TASKS) <= set(saved["results"])
    assert "samples" not in saved
    table = (ours.out_dir / "summary.md").read_text()
    assert table == ours.table
    assert all(task in table for task in TASKS)


# -- the scorer against the plain computation ------------------------------------------------


def _plain(model, context: list[int], continuation: list[int], max_length: int):
    """One forward over the whole input, as lm-eval's hf model computes a request."""
    tokens = lm_harness.model_input(context, continuation, max_length)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).float(), -1)[0]
    scored = logprobs[len(tokens) - len(continuation) :]
    target = torch.tensor(continuation)
    total = float(scored.gather(-1, target[:, None]).sum())
    return total, bool((scored.argmax(-1) == target).all())


def _requests(vocab: int, seed: int = 0):
    """Shared contexts (four choices each), one-token choices that share an input, questions
    sharing a few-shot prefix, duplicate requests, contexts of one token, and inputs truncated
    at max_length (96)."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(5, vocab) for _ in range(n)]

    requests = []
    for _ in range(5):  # questions: one context, four choices
        context = [2] + toks(rng.randrange(1, 40))
        requests += [(context, toks(rng.randrange(1, 6))) for _ in range(4)]
    shared = [2] + toks(20)
    requests += [(shared, [t]) for t in toks(4)]  # one-token choices: one input
    fewshot = [2] + toks(30)
    for _ in range(3):  # questions after the same few-shot examples
        context = fewshot + toks(rng.randrange(1, 10))
        requests += [(context, toks(rng.randrange(1, 4))) for _ in range(3)]
    requests += [requests[3], requests[0]]  # the same request twice
    requests += [([2], toks(7)), ([2] + toks(150), toks(5)), ([2] + toks(90), toks(10))]
    return requests


@pytest.mark.parametrize(
    "rows, row_tokens, logit_positions",
    [(8, None, None), (3, 48, 3), (1, 1, 1), (2, 200, 5)],
    ids=["defaults", "small-rows", "one-row-per-forward", "wide-rows"],
)
def test_scorer_equals_plain_computation(
    tiny_model_dir: Path, monkeypatch, rows, row_tokens, logit_positions
) -> None:
    """Every packing (trees of many inputs per row, one input per row and forward, causal and
    tree-masked forwards) and logits in chunks give what one forward per request gives."""
    import codegemma

    cg = codegemma.load(tiny_model_dir, dtype="float32", device="cpu")
    vocab = cg.config.vocab_size
    if logit_positions:
        monkeypatch.setattr(lm_harness, "LOGIT_FLOATS", logit_positions * vocab)
    requests = _requests(vocab)
    scorer = lm_harness.ContinuationScorer(cg.model, rows=rows, row_tokens=row_tokens)
    forwards = list(scorer.iter_scores(requests, 96))
    assert sorted(i for answers in forwards for i, _ in answers) == list(range(len(requests)))
    if rows == 1:  # one row of (at least) the longest input per forward
        assert len(forwards) > 1
    got = scorer.score(requests, 96)
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=True):
        want_ll, want_greedy = _plain(cg.model, context, continuation, 96)
        assert abs(ll - want_ll) <= 1e-4, (len(context), len(continuation), ll, want_ll)
        assert greedy == want_greedy


def test_rows_share_prefixes_as_a_tree() -> None:
    """A row stores each shared prefix once; a node sees exactly its ancestors and itself."""
    inputs = [[2, 7, 8, 9], [2, 7, 8, 5], [2, 7, 8], [2, 7, 3]]
    rows, placed = lm_harness.plan_rows(inputs, [2, 1, 3, 1], row_tokens=64)
    (row,) = rows
    # sorted: [2,7,3] [2,7,8] [2,7,8,5] [2,7,8,9] -> nodes 2 7 3 | 8 | 5 | 9
    assert row.tokens == [2, 7, 3, 8, 5, 9]
    assert row.positions(7).tolist() == [0, 1, 2, 2, 3, 3, 0]
    assert [p.scored for p in placed] == [[3, 5], [4], [0, 1, 3], [2]]
    assert not row.chain
    mask = row.mask(7)
    for node, ancestors in ((2, [0, 1]), (3, [0, 1]), (4, [0, 1, 3]), (5, [0, 1, 3])):
        assert mask[node].nonzero()[:, 0].tolist() == ancestors + [node]
    assert mask[6].nonzero()[:, 0].tolist() == [6]  # padding sees itself
    rows, _ = lm_harness.plan_rows([[2, 7], [2, 7], [2, 7, 8, 9]], [1, 1, 2], row_tokens=64)
    assert len(rows) == 1 and rows[0].chain and rows[0].tokens == [2, 7, 8, 9]


def test_long_unrelated_inputs_get_rows_of_their_own() -> None:
    """Rolling windows: longer than a row's budget, sharing only BOS: one causal row each;
    the choices of a long question stay in one row."""
    windows = [[2, 2] + list(range(10 + i, 110 + i)) for i in range(3)]
    rows, _ = lm_harness.plan_rows(windows, [100] * 3, row_tokens=64)
    assert len(rows) == 3 and all(row.chain for row in rows)
    question = [2] + list(range(10, 110))
    rows, _ = lm_harness.plan_rows([question + [5], question + [6, 7]], [1, 2], row_tokens=64)
    assert len(rows) == 1 and not rows[0].chain and len(rows[0].tokens) == 104


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny_model_dir: Path) -> None:
    import codegemma

    cg = codegemma.load(tiny_model_dir, dtype="float32", device="cpu")
    context = cg.tokenizer.encode("def add(a, b):", bos=True)
    ids = cg.generate_results([context], max_new_tokens=5, stop_token_ids=())[0].token_ids
    scorer = lm_harness.ContinuationScorer(cg.model)
    (_, greedy), (_, other) = scorer.score([(context, ids), (context, ids[:-1] + [4])], 512)
    assert greedy is True and other is False


# -- errors ----------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_hub_dataset_is_an_eval_error_naming_it(tmp_path: Path, no_network) -> None:
    (tmp_path / "missing.yaml").write_text(
        "task: codegemma_test_missing\n"
        "dataset_path: codegemma-tests/not-on-this-machine\n"
        "dataset_name: main\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
    )
    with pytest.raises(EvalError) as info:
        lm_harness.run_lm_eval(
            None, "codegemma_test_missing", include_path=tmp_path, out_dir=tmp_path / "out"
        )
    message = str(info.value)
    assert "codegemma_test_missing" in message
    assert "codegemma-tests/not-on-this-machine" in message and "main" in message
    assert "load_dataset('codegemma-tests/not-on-this-machine', 'main')" in info.value.fix
    assert not (tmp_path / "out").exists()


def test_missing_local_data_file_is_an_eval_error(tmp_path: Path, no_network) -> None:
    (tmp_path / "local.yaml").write_text(
        "task: codegemma_test_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'absent.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
    )
    with pytest.raises(EvalError, match="codegemma_test_local.*absent.jsonl"):
        lm_harness.run_lm_eval(
            None, "codegemma_test_local", include_path=tmp_path, out_dir=tmp_path / "out"
        )


def test_generation_kwargs_are_read_as_hf_reads_them() -> None:
    sampling = lm_harness.CodeGemmaLM._sampling
    params, until, max_context = sampling(_Stub(), {"until": "Q:", "max_new_tokens": 8})
    assert (params.max_new_tokens, params.temperature, until) == (8, 0.0, ["Q:", "<eos>"])
    assert max_context == 512 - 8 and params.stop_token_ids == {1}
    params, _, _ = sampling(_Stub(), {"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.7, 0.9, 16)
    params, _, _ = sampling(_Stub(), {"do_sample": False, "temperature": 0.7})
    assert params.temperature == 0.0
    with pytest.raises(EvalError, match="num_beams"):
        sampling(_Stub(), {"until": ["\n"], "num_beams": 4})


class _Stub:
    """Just what `_sampling` reads from the adapter."""

    max_gen_toks, max_length, eot_token_id = 16, 512, 1

    def tok_decode(self, tokens, skip_special_tokens=True) -> str:
        return "<eos>"

    def _stop_ids(self) -> frozenset[int]:
        return frozenset({1})


# -- presets and the command line ------------------------------------------------------------


def test_card_preset_is_the_nine_benchmarks() -> None:
    tasks = lm_harness.expand_tasks("card")
    assert list(tasks) == [
        "boolq",
        "piqa",
        "triviaqa",
        "arc_challenge",
        "hellaswag",
        "mmlu",
        "winogrande",
        "gsm8k",
        "minerva_math",
    ]
    assert lm_harness.expand_tasks("card,boolq") == tasks
    assert lm_harness.expand_tasks(["piqa", " gsm8k "]) == {"piqa": None, "gsm8k": None}
    with pytest.raises(EvalError):
        lm_harness.expand_tasks(" , ")


def test_card_tasks_exist_in_lm_eval() -> None:
    """Every preset name is a task or group of the installed lm-eval (indexed from the task
    folders that hold them, not all ~14000 task files)."""
    from lm_eval.tasks._index import TaskIndex

    root = Path(lm_eval.tasks.__file__).parent
    folders = ["super_glue", "piqa", "triviaqa", "arc", "hellaswag", "mmlu", "winogrande"]
    folders += ["gsm8k", "minerva_math", "benchmarks"]
    index = TaskIndex.build([root / f for f in folders])
    assert set(lm_eval_cli.CARD_TASKS) <= set(index), set(lm_eval_cli.CARD_TASKS) - set(index)


def test_command_line(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    lm_eval_cli.register_lm_eval(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["lm-eval", "--tasks", "card", "--limit", "0.5", "--num-fewshot", "1", "--out", "o"]
    )
    assert (args.tasks, args.limit, args.num_fewshot, args.out) == ("card", 0.5, 1, "o")
    assert (args.model, args.dtype, args.batch_size, args.include_path) == (
        None,
        "float32",
        8,
        None,
    )
    assert args.func is lm_eval_cli.cmd_lm_eval
    assert parser.parse_args(["lm-eval", "--tasks", "x", "--out", "o", "--limit", "20"]).limit == 20
    with pytest.raises(SystemExit):
        parser.parse_args(["lm-eval", "--tasks", "x"])  # --out is required


# -- codegemma eval report -------------------------------------------------------------------


def test_report_shows_the_run_beside_coding_runs(runs, tmp_path: Path) -> None:
    from codegemma.eval.report import report

    ours, _ = runs
    coding = tmp_path / "single-line"
    coding.mkdir()
    summary = {
        "taskset": "humaneval-single-line",
        "model": "m",
        "num_tasks": 40,
        "set_size": 1033,
        "samples_per_task": 1,
        "pass_at_k": {"pass@1": 0.0},
        "isolation": "full",
        "generation_seconds": 1.0,
        "config": {"max_new_tokens": 128, "batch_size": 8, "temperature": 0.0},
    }
    (coding / "summary.json").write_text(json.dumps(summary))
    text = report([coding, ours.out_dir])
    assert "0.00% (40 of 1033 tasks)" in text  # the coding table is still there
    acc = ours.results["results"]["codegemma_test_mc"]["acc,none"]
    assert f"| codegemma_test_mc | acc | {100 * acc:.2f}% |" in text
    assert "| codegemma_test_gen | exact_match (strict-match) |" in text
    assert "PARTIAL (--limit)" not in text  # every document of every task was evaluated


def test_report_marks_partial_lm_eval_runs_and_sums_groups(tmp_path: Path) -> None:
    """A --limit run says how many documents it covered; a group's count is its leaves'."""
    from codegemma.eval.report import report

    results = {
        "results": {
            "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.1},
            "mmlu_anatomy": {"acc,none": 0.4},
            "mmlu_astronomy": {"acc,none": 0.6},
            "boolq": {"acc,none": 0.75, "acc_stderr,none": 0.01},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"], "boolq": []},
        "n-samples": {
            "mmlu_anatomy": {"original": 135, "effective": 10},
            "mmlu_astronomy": {"original": 152, "effective": 10},
            "boolq": {"original": 3270, "effective": 3270},
        },
        "n-shot": {"mmlu": 5, "boolq": 0},
        "config": {"model_path": "/models/codegemma-2b"},
        "lm_eval_version": "0.4.13",
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = report([tmp_path])
    lines = text.splitlines()
    assert lines[0] == "| benchmark | metric | codegemma-2b (ours) |"
    assert lines[2] == "| boolq | acc | 75.00% |"  # the card's order: BoolQ first
    assert lines[3] == "| mmlu | acc | 50.00% (20 of 287 docs) |"
    assert not any("mmlu_anatomy" in line for line in lines)  # subtasks of a group: its row
    assert "PARTIAL (--limit): mmlu 20 of 287 documents" in text
