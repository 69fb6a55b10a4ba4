"""The scheduler thread on its own: batching, routing, admission, cancellation, engine failure."""

from __future__ import annotations

import asyncio

import pytest

from codegemma.engine import Engine, SamplingParams
from codegemma.server.prometheus import SchedulerMetrics, ServerMetrics
from codegemma.server.scheduler import GenerationFailed, Overloaded, Scheduler


@pytest.fixture
def scheduler(tiny_cg):
    engine = Engine(tiny_cg.model, tiny_cg.tokenizer, max_batch_size=4)
    s = Scheduler(engine, max_queue=4, events=SchedulerMetrics())
    yield s
    s.stop()


async def _texts(submission) -> dict[int, str]:
    results = {}
    async for index, event in submission.events():
        if event.finished:
            results[index] = event.result
    return results


def test_concurrent_submissions_match_the_engine_alone(scheduler, tiny_cg):
    prompts = [tiny_cg.tokenizer.encode(p, bos=True) for p in ("def a", "import os", "x = [", "#")]
    params = SamplingParams(max_new_tokens=10)

    async def main():
        subs = [scheduler.submit([(p, params)]) for p in prompts]
        return await asyncio.gather(*(_texts(s) for s in subs))

    got = [r[0].token_ids for r in asyncio.run(main())]
    reference = Engine(tiny_cg.model, tiny_cg.tokenizer, max_batch_size=1)
    assert got == [r.token_ids for r in reference.generate(prompts, params)]
    assert scheduler.events.batch.count() >= 10 and scheduler.in_flight == 0
    metrics = ServerMetrics(scheduler.events, load=scheduler.load)
    assert 'codegemma_step_batch_size_bucket{le="4"}' in metrics.render()
    assert "\ncodegemma_in_flight_sequences 0\n" in metrics.render()


def test_admission_is_bounded_and_all_or_nothing(scheduler, tiny_cg):
    ids = tiny_cg.tokenizer.encode("def", bos=True)
    params = SamplingParams(max_new_tokens=50)

    async def main():
        first = scheduler.submit([(ids, params)] * 6)
        with pytest.raises(Overloaded):
            scheduler.submit([(ids, params)] * 3)  # 6 + 3 > 4 slots + 4 queued
        assert scheduler.in_flight == 6
        second = scheduler.submit([(ids, params)] * 2)
        await asyncio.gather(_texts(first), _texts(second))

    asyncio.run(main())
    assert scheduler.in_flight == 0


def test_cancel_frees_the_slot_and_ends_the_stream(scheduler, tiny_cg):
    ids = tiny_cg.tokenizer.encode("def", bos=True)

    async def main():
        sub = scheduler.submit([(ids, SamplingParams(max_new_tokens=400, temperature=1.0))])
        async for _, event in sub.events():
            if not event.finished:
                sub.cancel()
            else:
                return event.result

    result = asyncio.run(main())
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 400
    assert scheduler.in_flight == 0 and scheduler.active == 0


def test_an_engine_failure_fails_live_requests_and_the_thread_goes_on(scheduler, tiny_cg):
    ids = tiny_cg.tokenizer.encode("def", bos=True)
    real_step, calls = scheduler.engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real_step()

    scheduler.engine.step = flaky_step

    async def main():
        sub = scheduler.submit([(ids, SamplingParams(max_new_tokens=50))] * 2)
        with pytest.raises(GenerationFailed, match="device lost"):
            await _texts(sub)
        return await _texts(scheduler.submit([(ids, SamplingParams(max_new_tokens=3))]))

    assert len(asyncio.run(main())[0].token_ids) == 3
    assert scheduler.in_flight == 0 and scheduler.active == 0 and scheduler.alive


def test_an_invalid_prompt_fails_only_its_request(scheduler, tiny_cg):
    too_long = [2] * 10_000

    async def main():
        bad = scheduler.submit([(too_long, SamplingParams(max_new_tokens=2))])
        good = scheduler.submit(
            [(tiny_cg.tokenizer.encode("a", bos=True), SamplingParams(max_new_tokens=2))]
        )
        with pytest.raises(GenerationFailed, match="context"):
            await _texts(bad)
        return await _texts(good)

    assert asyncio.run(main())[0].finish_reason in ("stop", "length")
    assert scheduler.in_flight == 0
