"""OpenAI completions `logprobs` and `echo`, through the `openai` package and as
lm-evaluation-harness's `local-completions` model sends and parses them (its own
`_create_payload` and `parse_logprobs`, lm-eval 0.4.13), against a live server.

The reference numbers come from one forward pass of the model over the whole sequence, without
a KV cache, independent of the server's chunked scorer.
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

from codegemma import prompts
from codegemma.engine import SamplingParams

MODEL_ID = "tiny-codegemma"  # conftest's served model name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_logprobs(cg, ids: list[int]) -> torch.Tensor:
    """Each position's log-distribution of the next token [T-1, V]: row i is P(. | ids[:i+1])."""
    with torch.inference_mode():
        logits = cg.model(torch.tensor([ids]))[0].float()
    return logits.log_softmax(-1)[:-1]


def test_generated_tokens_logprobs(client, tiny_cg):
    reply = client.completions.create(
        model=MODEL_ID, prompt="def add(a, b):", max_tokens=8, temperature=0, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == reply.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset : offset + len(token)] == token
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 4  # the 3 most likely, and the chosen token
        assert logprob == max(top.values())  # greedy: the chosen token is the most likely
    # the same numbers as an independent forward pass over prompt + completion (the greedy
    # completion generated again here, as token ids)
    tok = tiny_cg.tokenizer
    prompt_ids = tok.encode("def add(a, b):", bos=True)
    ids = prompt_ids + tiny_cg.engine.generate([prompt_ids], fim_params(tok, 8))[0].token_ids
    ref = reference_logprobs(tiny_cg, ids)
    expected = ref[len(prompt_ids) - 1 :].gather(-1, torch.tensor(ids[len(prompt_ids) :])[:, None])[
        :, 0
    ]
    assert lp.token_logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def fim_params(tok, max_new_tokens: int) -> SamplingParams:
    """The server's parameters for a plain greedy completion."""
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=prompts.fim_stop_ids(tok))


def test_echo_with_max_tokens_zero_scores_the_prompt(client, tiny_cg):
    tok = tiny_cg.tokenizer
    text = "import os\nprint(os.getcwd())\n"
    reply = client.completions.create(
        model=MODEL_ID, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    ids = tok.encode(text, bos=True)
    assert choice.text == text and reply.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.tokens[0] == "" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(tiny_cg, ids)
    expected = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    # token-id prompts are echoed as their text and scored the same
    by_ids = client.completions.create(
        model=MODEL_ID, prompt=ids, max_tokens=0, echo=True, logprobs=1
    ).choices[0]
    assert by_ids.logprobs.token_logprobs == lp.token_logprobs
    assert by_ids.text == tok.decode(ids) == "".join(by_ids.logprobs.tokens)


def test_echo_with_generation_covers_prompt_then_completion(client, tiny_cg):
    reply = client.completions.create(
        model=MODEL_ID, prompt="x = ", max_tokens=5, echo=True, logprobs=2, temperature=0
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    prompt_len = len(tiny_cg.tokenizer.encode("x = ", bos=True))
    assert len(lp.tokens) == prompt_len + reply.usage.completion_tokens
    assert choice.text.startswith("x = ") and "".join(lp.tokens) == choice.text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(v is not None for v in lp.token_logprobs[1:])


def test_logprobs_refusals(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt="x", logprobs=21)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        list(client.completions.create(model=MODEL_ID, prompt="x", logprobs=2, stream=True))
    assert e.value.param == "logprobs"


def test_n_choices_each_get_their_own_logprobs(client):
    reply = client.completions.create(
        model=MODEL_ID, prompt="def ", max_tokens=6, temperature=1.0, n=2, seed=3, logprobs=1
    )
    for choice in reply.choices:
        assert "".join(choice.logprobs.tokens) == choice.text
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens)


# -- lm-evaluation-harness's local-completions -------------------------------------------------
def lm_eval_payload(messages, **kwargs) -> dict:
    """The exact body lm-eval 0.4.13 posts (its own `_create_payload`, which reads only
    `self.model` and, generating, `self._max_gen_toks`)."""
    this = SimpleNamespace(model=MODEL_ID, _max_gen_toks=256)
    return LocalCompletionsAPI._create_payload(this, messages, **kwargs)


def test_lm_eval_loglikelihood_requests(server, tiny_cg):
    tok = tiny_cg.tokenizer
    pairs = [("def add(a, b):\n", "    return a + b\n"), ("x = [1, 2", ", 3]")]
    inputs, ctxlens, expected = [], [], []
    for context, continuation in pairs:
        ctx = tok.encode(context, bos=True)
        cont = tok.encode(continuation)
        ids = ctx + cont
        inputs.append(ids)
        ctxlens.append(len(ctx))
        ref = reference_logprobs(tiny_cg, ids)[len(ctx) - 1 :]
        targets = torch.tensor(cont)
        chosen = ref.gather(-1, targets[:, None])[:, 0]
        expected.append((chosen.sum().item(), bool((ref.argmax(-1) == targets).all())))
    payload = lm_eval_payload(inputs, generate=False, seed=1234)
    assert payload["echo"] is True and payload["max_tokens"] == 1 and payload["logprobs"] == 1
    reply = httpx.post(server + "/v1/completions", json=payload, timeout=60)
    assert reply.status_code == 200, reply.text
    scores = LocalCompletionsAPI.parse_logprobs(reply.json(), tokens=inputs, ctxlens=ctxlens)
    assert len(scores) == 2
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(scores, expected, strict=True):
        assert logprob == pytest.approx(ref_logprob, abs=1e-3) and greedy == ref_greedy
    # one token generated after the echoed prompt, which lm-eval's [ctxlen:-1] leaves out
    for choice, ids in zip(reply.json()["choices"], inputs, strict=True):
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1


def test_lm_eval_greedy_continuation_is_reported_greedy(server, tiny_cg):
    tok = tiny_cg.tokenizer
    ctx = tok.encode("import os\n", bos=True)
    cont = tiny_cg.engine.generate([ctx], fim_params(tok, 4))[0].token_ids
    cont = [t for t in cont if t not in prompts.fim_stop_ids(tok)]
    payload = lm_eval_payload([ctx + cont], generate=False)
    reply = httpx.post(server + "/v1/completions", json=payload, timeout=60).json()
    ((_, greedy),) = LocalCompletionsAPI.parse_logprobs(reply, ctxlens=[len(ctx)])
    assert greedy is True


def test_lm_eval_generate_until(server, tiny_cg):
    tok = tiny_cg.tokenizer
    ctx = tok.encode("def f(x):\n", bos=True)
    payload = lm_eval_payload(
        [ctx],
        generate=True,
        gen_kwargs={"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
        eos="<eos>",
    )
    reply = httpx.post(server + "/v1/completions", json=payload, timeout=60)
    assert reply.status_code == 200, reply.text
    (text,) = LocalCompletionsAPI.parse_generations(reply.json())
    assert isinstance(text, str) and "\n\n" not in text


def test_lm_eval_remote_tokenizer(server, tiny_cg):
    """lm-eval's tokenizer_backend="auto" probes /tokenizer_info and /tokenize and then
    tokenizes through the server."""
    tok = tiny_cg.tokenizer
    base = server + "/v1/completions"
    assert check_remote_tokenizer_support(base)
    remote = RemoteTokenizer(base)
    assert remote.encode("def f():") == tok.encode("def f():")
    assert remote.decode(tok.encode("def f():")) == "def f():"
    assert remote.eos_token_id == tok.special.eos and remote.bos_token_id == tok.special.bos


def test_lm_eval_local_completions_model_scores_through_the_server(server, tiny_cg):
    """lm-eval's model class itself, as `--model local-completions` builds it: the remote
    tokenizer found by itself, loglikelihood requests scored through /v1/completions."""
    from lm_eval.api.instance import Instance

    lm = LocalCompletionsAPI(base_url=server + "/v1/completions", model=MODEL_ID, max_length=256)
    assert lm.tokenizer_backend == "remote"
    pairs = [("def add(a, b):", "\n    return a + b"), ("import", " os")]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(pairs)
    ]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    tok = tiny_cg.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, scores, strict=True):
        # lm-eval's `_encode_pair`: the context's ids, then the whole text's ids after as many
        context_ids = tok.encode(context)
        ids = context_ids + tok.encode(context + continuation)[len(context_ids) :]
        ctxlen = len(context_ids)
        ref = reference_logprobs(tiny_cg, ids)[ctxlen - 1 :]
        targets = torch.tensor(ids[ctxlen:])
        assert logprob == pytest.approx(ref.gather(-1, targets[:, None]).sum().item(), abs=1e-3)
        assert greedy == bool((ref.argmax(-1) == targets).all())
