"""lm-eval's `local-completions` model pointed at a live `codegemma serve` gives the answers of
our adapter (`codegemma.eval.lm_harness`) on the same checkpoint.

local-completions scores a request by sending its token ids (context + continuation, BOS first:
`add_bos_token=True` as our adapter and `hf` encode Gemma prompts) to /v1/completions with
`echo: true, logprobs: 1, max_tokens: 1`, and reads the continuation's log-probabilities from
`logprobs.token_logprobs` (greedy: each equals the top-1 of `top_logprobs`). Both run the local
multiple-choice and rolling-perplexity tasks of tests/eval/data/lm_tasks; the windows of the
rolling task are the same when our adapter's max_length is the API model's max_length - 2 (it
keeps a position for the token it asks the server to generate, and one for the window's
context token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

lm_harness = pytest.importorskip("codegemma.eval.lm_harness")
pytest.importorskip("tenacity", reason="local-completions needs lm-eval[api]")
pytest.importorskip("aiohttp", reason="local-completions needs lm-eval[api]")
import lm_eval  # noqa: E402  (lm_harness switches Hugging Face libraries offline first)
from live_server import run_server  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

pytestmark = pytest.mark.slow  # a live server and two lm-eval runs: ~30 s on a loaded machine

TASK_DIR = Path(__file__).parent / "data" / "lm_tasks"
TASKS = ["codegemma_test_mc", "codegemma_test_ppl"]
SERVED = "tiny-codegemma"
API_MAX_LENGTH = 512  # the tiny model's context: prompts of up to 511 tokens + 1 generated


@contextlib.contextmanager
def _live_server(tiny_model_dir: Path) -> Iterator[str]:
    """`codegemma serve` of the tiny checkpoint (fp32, CPU) on a free loopback port."""
    import codegemma
    from codegemma.engine import Engine
    from codegemma.server import ServerSettings, create_app

    cg = codegemma.load(tiny_model_dir, dtype="float32", device="cpu")
    engine = Engine(cg.model, cg.tokenizer, max_batch_size=4)
    app = create_app(engine, ServerSettings(served_model_name=SERVED, max_tokens=64))
    with run_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path):
    """(local-completions' results against the server, our adapter's), samples logged."""
    manager = lm_eval.tasks.TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp, _live_server(tiny_model_dir) as url:
        mp.chdir(TASK_DIR)  # the YAMLs' data files are relative paths
        api = LocalCompletionsAPI(
            base_url=f"{url}/v1/completions",
            model=SERVED,
            tokenizer=str(tiny_model_dir),  # transformers' tokenizer of the checkpoint, offline
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            add_bos_token=True,
            max_length=API_MAX_LENGTH,
            batch_size=4,
            max_retries=1,
            timeout=120,
        )
        theirs = lm_eval.simple_evaluate(
            api, tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=True
        )
    ours_lm = lm_harness.CodeGemmaLM(
        str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        batch_size=4,
        max_length=API_MAX_LENGTH - 2,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASK_DIR)
        ours = lm_eval.simple_evaluate(
            ours_lm, tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=True
        )
    return theirs, ours


def _pairs(theirs: dict, ours: dict, task: str) -> list[tuple[dict, dict]]:
    api, mine = theirs["samples"][task], ours["samples"][task]
    assert [s["doc_id"] for s in api] == [s["doc_id"] for s in mine] and api
    return list(zip(api, mine, strict=True))


def test_server_loglikelihoods_equal_the_adapters(runs) -> None:
    theirs, ours = runs
    requests = 0
    for api, mine in _pairs(theirs, ours, "codegemma_test_mc"):
        assert [list(a) for a in api["arguments"]] == [list(a) for a in mine["arguments"]]
        for (ll, greedy), (our_ll, our_greedy) in zip(
            [r[0] for r in api["resps"]], [r[0] for r in mine["resps"]], strict=True
        ):
            assert abs(ll - our_ll) <= 1e-4, (api["doc_id"], ll, our_ll)
            assert greedy == our_greedy
            requests += 1
    assert requests == 14 * 4
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            theirs["results"]["codegemma_test_mc"][metric]
            == ours["results"]["codegemma_test_mc"][metric]
        )


def test_server_rolling_loglikelihoods_equal_the_adapters(runs) -> None:
    theirs, ours = runs
    for api, mine in _pairs(theirs, ours, "codegemma_test_ppl"):
        (total,), (our_total,) = api["resps"][0], mine["resps"][0]
        # a sum over up to ~1600 tokens (several windows): fp32 rounding of the sum
        assert math.isclose(total, our_total, rel_tol=1e-6, abs_tol=1e-4), (total, our_total)
    assert math.isclose(
        theirs["results"]["codegemma_test_ppl"]["byte_perplexity,none"],
        ours["results"]["codegemma_test_ppl"]["byte_perplexity,none"],
        rel_tol=1e-5,
    )
