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


def test_scorer_equals_plain_computation(tiny_model_dir: Path, monkeypatch) -> None:
    """Shared contexts, one-token continuations that share an input, continuations of several
    tokens, contexts of one token, inputs truncated at max_length, and tiny chunk budgets so both
    passes run in several chunks."""
    import codegemma

    cg = codegemma.load(tiny_model_dir, dtype="float32", device="cpu")
    rng = random.Random(0)
    vocab = cg.config.vocab_size

    def toks(n: int) -> list[int]:
        return [rng.randrange(5, vocab) for _ in range(n)]

    max_length = 96
    requests = []
    for _ in range(5):  # questions: one context, four choices
        context = [2] + toks(rng.randrange(1, 40))
        requests += [(context, toks(rng.randrange(1, 6))) for _ in range(4)]
    shared = [2] + toks(20)
    requests += [(shared, [t]) for t in toks(4)]  # one-token choices: one input
    requests += [([2], toks(7)), ([2] + toks(150), toks(5)), ([2] + toks(90), toks(10))]
    monkeypatch.setattr(lm_harness, "LOGIT_FLOATS", 3 * vocab * 8)  # 3 tail positions per row
    scorer = lm_harness.ContinuationScorer(cg.model, prefill_tokens=64)
    got = []
    for at in range(0, len(requests), 8):  # batches of 8, as _loglikelihood_tokens makes them
        got += scorer.score(requests[at : at + 8], max_length)
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=True):
        want_ll, want_greedy = _plain(cg.model, context, continuation, max_length)
        assert abs(ll - want_ll) <= 1e-4, (len(context), len(continuation), ll, want_ll)
        assert greedy == want_greedy


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
