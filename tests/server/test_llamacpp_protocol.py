"""llama.cpp's server protocol, raw HTTP: every field of /infill and /completion this server
honours, and the shapes of its answers compared with llama.cpp's documented ones.

The reference shapes below are llama.cpp's (ggml-org/llama.cpp, tools/server/README.md, "POST
/completion" response format, "GET /slots", "GET /props", "POST /tokenize"; and
tools/server/server-task.cpp, `server_task_result_cmpl_final::to_json_non_oaicompat`,
`..._partial::to_json_non_oaicompat`, `result_timings::to_json`,
`completion_token_output::probs_vector_to_json`).

Rules that need an exact model output (n_indent, t_max_predict_ms, ignore_eos) use the scripted
model, which writes a fixed token sequence after any prompt.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from scripted_model import ScriptedModel

from codegemma import middle, prompts
from codegemma.engine import Engine
from codegemma.prompts import ContextFile
from codegemma.server import ServerSettings, create_app

# -- llama.cpp's shapes --------------------------------------------------------------------------
# to_json_non_oaicompat of the final result (keys this server writes; llama.cpp's recent builds
# add reasoning and loop-guard fields that have no meaning here)
FINAL_KEYS = {
    "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted",
    "tokens_evaluated", "generation_settings", "prompt", "has_new_line", "truncated",
    "stop_type", "stopping_word", "tokens_cached", "timings",
}  # fmt: skip
# README, "Response format" of POST /completion: the fields it documents
DOCUMENTED_KEYS = {
    "content", "tokens", "stop", "generation_settings", "model", "prompt", "stop_type",
    "stopping_word", "timings", "tokens_cached", "tokens_evaluated", "truncated",
}  # fmt: skip
PARTIAL_KEYS = {
    "index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"
}  # fmt: skip
TIMINGS_KEYS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}  # fmt: skip
PROB_KEYS = {"id", "token", "bytes", "logprob", "top_logprobs"}
TOP_PROB_KEYS = {"id", "token", "bytes", "logprob"}
STOP_TYPES = {"none", "eos", "limit", "word"}
SLOT_KEYS = {"id", "id_task", "n_ctx", "speculative", "is_processing", "params", "next_token"}
NEXT_TOKEN_KEYS = {"has_next_token", "has_new_line", "n_remain", "n_decoded"}
PROPS_KEYS = {
    "default_generation_settings", "total_slots", "model_path", "chat_template", "modalities",
    "build_info",
}  # fmt: skip

PREFIX = "import math\n\n\ndef area(r):\n"
SUFFIX = "\n\n\nprint(area(2))\n"
EXTRA = [
    {"filename": "consts.py", "text": "PI = 3.14159\nE = 2.71828\n"},
    {"filename": "util.py", "text": "def square(x):\n    return x * x\n"},
]
INFILL = {
    "input_prefix": PREFIX,
    "prompt": "    return ",
    "input_suffix": SUFFIX,
    "input_extra": EXTRA,
    "n_predict": 12,
}


def sse_events(raw: bytes) -> list[dict]:
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: ") :]) for e in events]


def check_final(body: dict, *, n_probs: int = 0) -> None:
    """The final result has llama.cpp's keys and types; the numbers agree with each other."""
    expected = FINAL_KEYS | ({"completion_probabilities"} if n_probs else set())
    assert set(body) == expected, set(body) ^ expected
    assert set(body) >= DOCUMENTED_KEYS
    assert body["stop"] is True and body["stop_type"] in STOP_TYPES
    assert isinstance(body["content"], str) and isinstance(body["prompt"], str)
    assert isinstance(body["truncated"], bool) and isinstance(body["has_new_line"], bool)
    timings = body["timings"]
    assert TIMINGS_KEYS <= set(timings) <= TIMINGS_KEYS | {"draft_n", "draft_n_accepted"}
    assert timings["cache_n"] == body["tokens_cached"]
    assert timings["cache_n"] + timings["prompt_n"] == body["tokens_evaluated"]
    assert timings["predicted_n"] == body["tokens_predicted"]
    assert timings["prompt_ms"] > 0 and timings["prompt_per_second"] > 0
    if timings["predicted_ms"] > 0:
        per_token = timings["predicted_ms"] / timings["predicted_n"]
        assert timings["predicted_per_token_ms"] == pytest.approx(per_token)
    if body["stop_type"] == "word":
        assert body["stopping_word"]
    else:
        assert body["stopping_word"] == ""
    if n_probs:
        check_probs(body["completion_probabilities"], n_probs, body["tokens_predicted"])


def check_probs(probs: list[dict], n_probs: int, count: int) -> None:
    assert len(probs) == count
    for entry in probs:
        assert set(entry) == PROB_KEYS
        assert isinstance(entry["id"], int) and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode("utf-8")) or "\ufffd" in entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == n_probs and all(set(t) == TOP_PROB_KEYS for t in top)
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one, with the same number
        assert top[0]["id"] == entry["id"] and top[0]["logprob"] == entry["logprob"]


@pytest.fixture(scope="module")
def live(serve):
    with (
        serve(max_tokens=64, max_batch_size=4) as (url, app),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client, app


# -- /infill -------------------------------------------------------------------------------------
def test_infill_answer_has_llamacpp_shape(live):
    http, _ = live
    body = http.post("/infill", json=INFILL).json()
    check_final(body)
    assert body["tokens"] == []  # only with return_tokens, as llama.cpp
    assert body["id_slot"] == -1 and body["truncated"] is False
    settings = body["generation_settings"]
    assert settings["n_predict"] == 12 and settings["temperature"] == 0.0


def test_input_extra_is_codegemmas_multi_file_layout(live, tiny_cg):
    http, _ = live
    body = http.post("/infill", json=INFILL).json()
    tok = tiny_cg.tokenizer
    files = [ContextFile(path=e["filename"], text=e["text"]) for e in EXTRA]
    ids = prompts.fim_prompt(tok, PREFIX + INFILL["prompt"], SUFFIX, files=files)
    assert body["prompt"] == tok.decode(ids) and body["tokens_evaluated"] == len(ids)
    sep = tok.decode([tok.special.file_separator])
    assert body["prompt"].startswith(
        f"{tok.decode([tok.special.bos])}consts.py\nPI = 3.14159\nE = 2.71828\n{sep}util.py\n"
    )


def test_fitting_keeps_the_prefix_end_the_suffix_start_and_the_last_files(tiny_tokenizer):
    tok = tiny_tokenizer
    prefix = "".join(f"line_{i} = {i}\n" for i in range(200))
    suffix = "".join(f"after_{i} = {i}\n" for i in range(200))
    files = [ContextFile(path=f"f{i}.py", text=f"X{i} = {i}\n" * 4) for i in range(12)]
    sizes = [len(prompts.context_file_ids(tok, f)) + 1 for f in files]  # with the separator
    fitted = prompts.fit_infill_prompt(tok, prefix, suffix, files, budget=300, files_budget=100)
    assert len(fitted.ids) == 300 and fitted.truncated
    # the most recent files (the last ones) that fit whole in files_budget, in their order
    kept = max(k for k in range(len(files) + 1) if sum(sizes[len(files) - k :]) <= 100)
    assert 0 < fitted.files_kept == kept < len(files)
    text = tok.decode(fitted.ids)
    assert text.startswith(f"<bos>f{12 - kept}.py\n") and "f11.py" in text
    sp = tok.special
    at = [fitted.ids.index(t) for t in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle)]
    room = 300 - prompts.FIM_OVERHEAD - sum(sizes[len(files) - kept :])
    assert (at[1] - at[0] - 1, at[2] - at[1] - 1) == (room - room // 4, room // 4)  # 3:1
    assert text.split("<|fim_suffix|>")[0].endswith("line_199 = 199\n")  # the prefix's end
    assert "line_0 = 0" not in text
    assert "<|fim_suffix|>after_0 = 0\n" in text and "after_199" not in text  # the suffix's start
    # a short local context leaves its share unused; the files' share does not grow
    short = prompts.fit_infill_prompt(
        tok, "a = 1\n", "b = 2\n", files, budget=300, files_budget=100
    )
    assert short.files_kept == kept
    assert short.ids == prompts.fim_prompt(tok, "a = 1\n", "b = 2\n", files=files[-kept:])
    # files fitted the same way, whatever the prefix, suffix and budget: the same first tokens
    warm = prompts.fit_infill_prompt(tok, "", "", files, budget=500, files_budget=100)
    start = fitted.ids[: at[0]]
    assert warm.ids[: len(start)] == start
    untouched = prompts.fit_infill_prompt(tok, "a = 1\n", "b = 2\n", files[:2], budget=300)
    assert not untouched.truncated
    assert untouched.ids == prompts.fim_prompt(tok, "a = 1\n", "b = 2\n", files=files[:2])


def test_a_prompt_fitted_to_the_budget_says_truncated(serve):
    with serve(max_tokens=64, max_prompt_tokens=60) as (url, _):
        body = httpx.post(url + "/infill", json=INFILL, timeout=60).json()
    check_final(body)
    assert body["truncated"] is True and body["tokens_evaluated"] <= 60


def test_stream_partials_and_final_have_llamacpp_shape(live):
    http, _ = live
    plain = http.post("/infill", json=INFILL).json()
    with http.stream("POST", "/infill", json={**INFILL, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read())
    *partials, final = events
    for event in partials:
        assert set(event) == PARTIAL_KEYS and event["stop"] is False
    check_final(final)
    assert "".join(e["content"] for e in events) == plain["content"]
    streamed_ids = [t for e in partials for t in e["tokens"]]
    assert len(streamed_ids) <= final["tokens_predicted"]


def test_tokens_cached_counts_the_prefix_cache(serve):
    """The fix for `tokens_cached: 0` while /metrics counted thousands of cached tokens."""
    with serve(max_tokens=64) as (url, app):
        first = httpx.post(url + "/infill", json=INFILL, timeout=60).json()
        before = app.state.server.metrics.scheduler.cached_prompt_tokens.total()
        second = httpx.post(url + "/infill", json=INFILL, timeout=60).json()
        after = app.state.server.metrics.scheduler.cached_prompt_tokens.total()
    assert first["tokens_cached"] == 0
    check_final(second)
    assert second["tokens_cached"] == second["tokens_evaluated"] - 1  # all but the last token
    assert second["timings"]["prompt_n"] == 1
    assert after - before == second["tokens_cached"]
    assert second["content"] == first["content"]


def test_warm_up_fills_the_cache_and_survives_a_hang_up(serve, wait_idle):
    """llama.vim's ring update and llama.vscode's FIM_PREP: `n_predict: 0` with the context
    files. The prefill runs to its end though the client closed the connection at once; the
    next completion reuses those files' keys and values."""
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": EXTRA, "prompt": ""}
    warm |= {"n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_predict_ms": 1}
    with serve(max_tokens=64) as (url, app):
        body = httpx.post(url + "/infill", json=warm, timeout=60).json()
        check_final(body)
        assert body["content"] == "" and body["tokens_predicted"] == 0
        assert body["timings"]["predicted_n"] == 0 and body["stop_type"] == "limit"
        extra = {**warm, "input_extra": [*EXTRA, {"filename": "more.py", "text": "Y = 5\n" * 20}]}
        payload = json.dumps(extra).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
        time.sleep(0.2)
        wait_idle(app)
        real = httpx.post(url + "/infill", json={**INFILL, "input_extra": extra["input_extra"]})
        real = real.json()
    tok_files = app.state.server.tokenizer
    files = [ContextFile(path=e["filename"], text=e["text"]) for e in extra["input_extra"]]
    files_tokens = len(prompts.fim_prompt(tok_files, "", "", files=files)) - 3
    assert real["tokens_cached"] >= files_tokens


def test_n_probs_gives_completion_probabilities(live):
    http, _ = live
    body = http.post("/infill", json={**INFILL, "n_probs": 3, "return_tokens": True}).json()
    check_final(body, n_probs=3)
    assert [p["id"] for p in body["completion_probabilities"]] == body["tokens"]
    with http.stream("POST", "/infill", json={**INFILL, "n_probs": 3, "stream": True}) as r:
        *_, final = sse_events(r.read())
    # streamed: every token's probabilities come with the final event (computed at the end)
    assert final["completion_probabilities"] == body["completion_probabilities"]


def test_post_sampling_probs_and_unknown_slots_are_refused(live):
    http, app = live
    reply = http.post("/infill", json={**INFILL, "n_probs": 2, "post_sampling_probs": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "post_sampling_probs"
    slots = app.state.server.scheduler.slots
    reply = http.post("/infill", json={**INFILL, "id_slot": slots})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "id_slot"
    assert (
        http.post("/infill", json={**INFILL, "id_slot": slots - 1}).json()["id_slot"] == slots - 1
    )


def test_n_cmpl_gives_an_array_and_greedy_copies_are_generated_once(live):
    http, app = live
    engine = app.state.server.engine
    before = engine.decode_stats.sequence_steps
    results = http.post("/infill", json={**INFILL, "n_cmpl": 3}).json()
    steps = engine.decode_stats.sequence_steps - before
    assert [r["index"] for r in results] == [0, 1, 2]
    assert len({r["content"] for r in results}) == 1
    for r in results:
        check_final(r)
    assert steps <= results[0]["tokens_predicted"]  # one sequence decoded, not three
    sampled = {**INFILL, "n_cmpl": 3, "temperature": 1.0, "seed": 5}
    contents = [r["content"] for r in http.post("/infill", json=sampled).json()]
    assert contents == [r["content"] for r in http.post("/infill", json=sampled).json()]
    assert len(contents) == 3


def test_response_fields_select_and_unnest(live):
    http, _ = live
    fields = ["content", "timings/prompt_n", "timings/predicted_ms", "tokens_cached", "nothing"]
    body = http.post("/infill", json={**INFILL, "response_fields": fields}).json()
    assert set(body) == {"content", "timings/prompt_n", "timings/predicted_ms", "tokens_cached"}
    assert isinstance(body["timings/prompt_n"], int)
    assert http.post("/infill", json={**INFILL, "response_fields": [""]}).json() == {}


def test_ignore_eos_generates_exactly_n_predict(live):
    http, _ = live
    for n in (5, 23):
        body = http.post("/infill", json={**INFILL, "n_predict": n, "ignore_eos": True}).json()
        check_final(body)
        assert body["tokens_predicted"] == n and body["stop_type"] == "limit"


def test_samplers_switch_off_the_samplers_they_leave_out(live):
    """`samplers` without "top_k" turns top_k off (llama.cpp: a sampler not listed is not
    used); names of samplers this server does not have are accepted and ignored."""
    http, _ = live
    sampled = {**INFILL, "temperature": 1.5, "seed": 11, "n_predict": 16}
    full = http.post("/infill", json=sampled).json()["content"]
    top1 = http.post("/infill", json={**sampled, "top_k": 1}).json()["content"]
    greedy = http.post("/infill", json={**INFILL, "n_predict": 16}).json()["content"]
    assert top1 == greedy and full != greedy
    unlisted = {**sampled, "top_k": 1, "samplers": ["dry", "top_p", "min_p", "infill"]}
    assert http.post("/infill", json=unlisted).json()["content"] == full
    as_chars = {**sampled, "top_k": 1, "samplers": "kt"}
    assert http.post("/infill", json=as_chars).json()["content"] == greedy


# -- /completion ---------------------------------------------------------------------------------
def test_completion_prompt_forms(live, tiny_cg):
    http, _ = live
    tok = tiny_cg.tokenizer
    text = http.post("/completion", json={"prompt": "def f(x):", "n_predict": 6}).json()
    check_final(text)
    ids = tok.encode("def f(x):", bos=True)
    as_ids = http.post("/completion", json={"prompt": ids, "n_predict": 6}).json()
    assert as_ids["content"] == text["content"] and as_ids["prompt"] == text["prompt"]
    mixed = http.post("/completion", json={"prompt": [ids[0], "def f(x):"], "n_predict": 6})
    assert mixed.json()["content"] == text["content"]
    several = http.post("/completion", json={"prompt": ["def f(x):", "import"], "n_predict": 4})
    assert [r["index"] for r in several.json()] == [0, 1]
    assert several.json()[0]["content"] == text["content"][: len(several.json()[0]["content"])]
    bad = http.post("/completion", json={"prompt": [1, 10**6], "n_predict": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_completion_in_the_textual_fim_layout_is_fim(live):
    http, _ = live
    infill = http.post(
        "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 12}
    ).json()
    layout = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    completion = http.post("/completion", json={"prompt": layout, "n_predict": 12}).json()
    assert completion["content"] == infill["content"]
    assert completion["tokens_evaluated"] == infill["tokens_evaluated"]


def test_speculative_stats_in_timings_and_metrics(serve, tiny_cg):
    """Drafts by prompt lookup show in `timings` (draft_n, draft_n_accepted, as llama.cpp
    writes them) and in /metrics, which reads the engine's counters."""
    with serve(max_tokens=64) as (url, app):
        engine = app.state.server.engine
        engine.speculative = True
        request = {"prompt": "a b c a b c a b c a b c a b", "n_predict": 24, "ignore_eos": True}
        body = httpx.post(url + "/completion", json=request, timeout=60).json()
        metrics = httpx.get(url + "/metrics").text
    timings = body["timings"]
    assert timings["draft_n"] > 0 and 0 <= timings["draft_n_accepted"] <= timings["draft_n"]
    stats = engine.decode_stats
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert values["codegemma_draft_tokens_total"] == stats.draft_tokens == timings["draft_n"]
    assert values["codegemma_draft_tokens_accepted_total"] == stats.accepted_draft_tokens
    assert values["codegemma_decode_steps_total"] == stats.decode_steps
    assert values["codegemma_verify_steps_total"] == stats.verify_steps > 0
    assert values["codegemma_decode_tokens_per_step"] == pytest.approx(stats.tokens_per_step)
    assert values["codegemma_draft_acceptance_rate"] == pytest.approx(stats.acceptance_rate)


def test_greedy_results_do_not_depend_on_speculation(serve):
    request = {**INFILL, "n_predict": 40, "ignore_eos": True}
    answers = []
    for speculative in (False, True):
        with serve(max_tokens=64) as (url, app):
            app.state.server.engine.speculative = speculative
            answers.append(httpx.post(url + "/infill", json=request, timeout=60).json())
    assert answers[0]["content"] == answers[1]["content"]
    assert "draft_n" not in answers[0]["timings"]


# -- /tokenize, /detokenize, /props, /slots --------------------------------------------------------
def test_tokenize_and_detokenize(live, tiny_cg):
    http, _ = live
    tok = tiny_cg.tokenizer
    plain = http.post("/tokenize", json={"content": "def f(): pass"}).json()
    assert plain == {"tokens": tok.encode("def f(): pass")}
    bos = http.post("/tokenize", json={"content": "x", "add_special": True}).json()["tokens"]
    assert bos == [tok.special.bos, *tok.encode("x")]
    special = http.post("/tokenize", json={"content": "<eos>x"}).json()["tokens"]
    assert special == [tok.special.eos, *tok.encode("x")]  # parse_special defaults to true
    literal = http.post("/tokenize", json={"content": "<eos>", "parse_special": False}).json()
    assert literal["tokens"] == tok.encode("<eos>") and tok.special.eos not in literal["tokens"]
    pieces = http.post("/tokenize", json={"content": "é x", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("é x")
    for p in pieces:  # a text when the piece is valid UTF-8, else its bytes
        assert isinstance(p["piece"], str) or all(isinstance(b, int) for b in p["piece"])
    joined = b"".join(
        p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces
    )
    assert joined.decode("utf-8") == "é x"
    back = http.post("/detokenize", json={"tokens": plain["tokens"]}).json()
    assert back["content"] == "def f(): pass" == back["prompt"]
    bad = http.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    vllm = http.post("/tokenize", json={"prompt": "<bos>", "add_special_tokens": False}).json()
    assert vllm == {"tokens": [tok.special.bos]}


def test_props_and_slots_have_llamacpp_shape(live, wait_idle):
    http, app = live
    wait_idle(app)
    props = http.get("/props").json()
    assert set(props) >= PROPS_KEYS
    assert props["total_slots"] == app.state.server.scheduler.slots
    assert props["default_generation_settings"]["n_ctx"] == app.state.server.ctx.max_seq_len
    slots = http.get("/slots").json()
    assert len(slots) == props["total_slots"]
    for i, slot in enumerate(slots):
        assert (
            set(slot) == SLOT_KEYS
            and slot["id"] == i
            and set(slot["next_token"]) == NEXT_TOKEN_KEYS
        )
        assert slot["is_processing"] is False
    assert http.get("/slots", params={"fail_on_no_slot": 1}).status_code == 200


class SlowScriptedModel(ScriptedModel):
    """Takes a few milliseconds per forward pass, so a generation is still running when a
    request about it arrives."""

    def forward(self, *args, **kwargs):
        time.sleep(0.005)
        return super().forward(*args, **kwargs)


def test_slots_show_a_running_sequence(tiny_tokenizer, serve_app):
    model = SlowScriptedModel(tiny_tokenizer.encode("x = 1\n") * 100)
    engine = Engine(model, tiny_tokenizer, max_batch_size=1, speculative=False)
    app = create_app(engine, ServerSettings(max_tokens=400))
    long = {"prompt": "a", "n_predict": 300, "stream": True}
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/completion", json=long) as r,
    ):
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(line for line in lines if line.startswith("data: "))
        slots = client.get("/slots").json()
        busy = client.get("/slots", params={"fail_on_no_slot": 1})
        last = json.loads([line for line in lines if line.startswith("data: ")][-1][6:])
    assert last["stop"] is True and last["tokens_predicted"] == 300
    decoded = slots[0]["next_token"]["n_decoded"]
    assert slots[0]["is_processing"] is True and 1 <= decoded < 300
    assert slots[0]["next_token"]["n_remain"] == 300 - decoded
    assert slots[0]["id_task"] >= 0 and slots[0]["next_token"]["has_new_line"] in (True, False)
    assert busy.status_code == 503


# -- rules that need an exact output: the scripted model ------------------------------------------
def scripted_client(tok, raw: str, *, eos: bool = True, repeat: int = 1) -> TestClient:
    script = tok.encode(raw) * repeat + ([tok.special.eos] if eos else [])
    model = ScriptedModel(script)
    engine = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    return TestClient(create_app(engine, ServerSettings(served_model_name="s", max_tokens=500)))


def test_n_indent_ends_at_the_first_line_indented_less(tiny_tokenizer):
    raw = "x = 1\n    y = 2\n    z = 3\nw = 4\n    v = 5\n"
    with scripted_client(tiny_tokenizer, raw) as client:
        plain = client.post("/completion", json={"prompt": "if a:", "n_predict": 64}).json()
        body = client.post(
            "/completion", json={"prompt": "if a:", "n_predict": 64, "n_indent": 4}
        ).json()
        blank = scripted_client(tiny_tokenizer, "a = 1\n\n    b = 2\n")
        with blank:
            cut = blank.post(
                "/completion", json={"prompt": "if a:", "n_predict": 64, "n_indent": 2}
            ).json()
    assert plain["content"] == raw and plain["stop_type"] == "eos"
    assert body["content"] == "x = 1\n    y = 2\n    z = 3\n" and body["stop_type"] == "limit"
    assert body["tokens_predicted"] < plain["tokens_predicted"]
    assert cut["content"] == "a = 1\n"  # as llama.cpp: a blank line ends it too


def test_t_max_predict_ms_ends_at_a_newline_after_the_time(tiny_tokenizer):
    with scripted_client(tiny_tokenizer, "ab = 1\n", eos=False, repeat=200) as client:
        request = {"prompt": "x", "n_predict": 500, "t_max_predict_ms": 1}
        body = client.post("/completion", json=request).json()
        untimed = client.post("/completion", json={**request, "t_max_predict_ms": 0}).json()
    assert body["stop_type"] == "limit" and body["content"].endswith("\n")
    assert body["tokens_predicted"] < 500 == untimed["tokens_predicted"]
    assert untimed["content"].startswith(body["content"])


def test_ignore_eos_keeps_going_past_stop_tokens_and_fim_rules(tiny_tokenizer):
    prefix, suffix = "def area(w, h):\n    total = mul(", ")\n    return total\n"
    raw = "w, h\n    return total\n"
    with scripted_client(tiny_tokenizer, raw) as client:
        request = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 40}
        normal = client.post("/infill", json=request).json()
        exact = client.post("/infill", json={**request, "ignore_eos": True}).json()
        plain = client.post("/completion", json={"prompt": "x", "n_predict": 30}).json()
        plain_exact = client.post(
            "/completion", json={"prompt": "x", "n_predict": 30, "ignore_eos": True}
        ).json()
    expected = middle.clean(raw, middle.FimRequest(prefix=prefix, suffix=suffix))
    assert normal["content"] == exact["content"] == expected
    assert normal["tokens_predicted"] < 40 == exact["tokens_predicted"]
    assert exact["stop_type"] == "limit"
    assert plain["stop_type"] == "eos" and plain["content"] == raw
    assert plain_exact["tokens_predicted"] == 30 and plain_exact["content"] == raw


def test_stop_words_are_reported(tiny_tokenizer):
    with scripted_client(tiny_tokenizer, "x = 1\ny = 2\n") as client:
        body = client.post("/completion", json={"prompt": "a", "stop": ["y ="], "n_predict": 30})
    body = body.json()
    assert body["stop_type"] == "word" and body["stopping_word"] == "y ="
    assert body["content"] == "x = 1\n"


def test_constraints_that_cannot_be_applied_are_refused(live):
    http, _ = live
    for field, value in [
        ("grammar", 'root ::= "a"'),
        ("json_schema", {"type": "string"}),
        ("logit_bias", [[15, False]]),
    ]:
        reply = http.post("/infill", json={**INFILL, field: value})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field
        assert http.post("/infill", json={**INFILL, field: None}).status_code == 200
    # knobs that only tune llama.cpp are accepted and have no effect here
    knobs = {"min_p": 0.05, "typical_p": 0.9, "mirostat": 0, "dry_multiplier": 0.8, "lora": []}
    knobs |= {"t_max_prompt_ms": 500, "n_keep": 4, "timings_per_token": True, "repeat_last_n": 64}
    plain = http.post("/infill", json=INFILL).json()["content"]
    assert http.post("/infill", json={**INFILL, **knobs}).json()["content"] == plain
