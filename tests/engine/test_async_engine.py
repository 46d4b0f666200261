"""The asyncio engine: streams, aborts, the waiting limit, shutdown and a failing step."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill import SamplingParams
from tokenmill.generation.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from tokenmill.generation.engine import EngineConfig


def _engine(llama_dir, **kw) -> AsyncEngine:
    return AsyncEngine.from_config(EngineConfig(model=llama_dir, dtype="float32", device="cpu", **kw))


def _params(engine: AsyncEngine, n: int, prompt_len: int = 4) -> SamplingParams:
    return engine.resolve_params(SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), prompt_len)


def test_streams_equal_the_offline_outputs_and_abort_ends_a_stream(llama_dir, llm):
    engine = _engine(llama_dir)
    prompts = [[5, 6, 7, i] for i in range(8, 14)]
    want = [
        o.outputs[0].token_ids
        for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ]

    async def collect(i):
        last = None
        async for out in engine.generate(prompts[i], _params(engine, 12), f"r{i}"):
            assert out.outputs[0].token_ids[: len(last.outputs[0].token_ids) if last else 0] == (
                last.outputs[0].token_ids if last else []
            )  # cumulative: every snapshot extends the one before
            last = out
        return last

    async def aborted():
        seen = []
        async for out in engine.generate([3, 4, 5, 6], _params(engine, 200), "victim"):
            seen.append(out)
            if len(seen) == 2:
                engine.abort("victim")
        return seen[-1]

    async def main():
        await engine.start()
        outs = await asyncio.gather(*(collect(i) for i in range(6)), aborted())
        await engine.shutdown(timeout=5)
        return outs

    outs = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in outs[:6]] == want
    victim = outs[6]
    assert victim.finished and victim.outputs[0].finish_reason == "abort"
    assert len(victim.outputs[0].token_ids) < 200
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_blocks_used == 0
    assert not engine.is_running


def test_a_full_engine_turns_new_requests_away(llama_dir):
    engine = _engine(llama_dir, max_num_seqs=1, max_waiting=1)

    async def main():
        await engine.start()
        first = engine.generate([3, 4, 5, 6], _params(engine, 200), "a")
        await first.__anext__()  # running: the only seat is taken
        second = engine.generate([3, 4, 5, 6], _params(engine, 5), "b")
        waiter = asyncio.ensure_future(second.__anext__())  # waits for the seat
        while engine.stats().num_waiting == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError, match="1 requests are already waiting"):
            await engine.generate([3, 4, 5, 6], _params(engine, 5), "c").__anext__()
        await first.aclose()  # leaving a stream aborts it; the waiter gets the seat
        await waiter
        await second.aclose()
        await engine.shutdown(timeout=5)

    asyncio.run(main())


def test_a_request_before_start_or_after_shutdown_is_refused(llama_dir):
    engine = _engine(llama_dir)

    async def main():
        with pytest.raises(EngineDeadError, match="not started"):
            await engine.generate([3, 4], _params(engine, 2, 2), "x").__anext__()
        await engine.start()
        await engine.shutdown(timeout=1)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await engine.generate([3, 4], _params(engine, 2, 2), "y").__anext__()

    asyncio.run(main())


def test_a_failing_step_ends_every_stream_with_the_reason(llama_dir, monkeypatch):
    engine = _engine(llama_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        await engine.start()
        monkeypatch.setattr(engine.engine.runner, "execute", broken)
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in engine.generate([3, 4, 5], _params(engine, 5, 3), "z"):
                pass
        assert not engine.is_running

    asyncio.run(main())


def test_a_request_the_engine_cannot_add_fails_alone(llama_dir, monkeypatch):
    engine = _engine(llama_dir)
    real = engine.engine.add_request

    def picky(request_id, *args, **kwargs):
        if request_id == "bad":
            raise RuntimeError("cannot build this one")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(engine.engine, "add_request", picky)

    async def main():
        await engine.start()
        with pytest.raises(ValueError, match="cannot build this one"):
            async for _ in engine.generate([3, 4, 5], _params(engine, 3, 3), "bad"):
                pass
        outs = [out async for out in engine.generate([3, 4, 5], _params(engine, 3, 3), "good")]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
        assert engine.is_running
        await engine.shutdown(timeout=5)

    asyncio.run(main())


def test_the_engine_is_built_and_stepped_on_one_thread(llama_dir, monkeypatch):
    """A second thread starting OpenMP regions would slow every matmul (see _TorchThread)."""
    import threading

    from tokenmill.generation.engine import LLMEngine

    seen: dict[str, set[int]] = {"build": set(), "step": set()}
    build, step = LLMEngine.from_config, LLMEngine.step

    def recording_build(config):
        seen["build"].add(threading.get_ident())
        return build(config)

    def recording_step(self):
        seen["step"].add(threading.get_ident())
        return step(self)

    monkeypatch.setattr(LLMEngine, "from_config", staticmethod(recording_build))
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    engine = _engine(llama_dir)

    async def main():
        await engine.start()
        async for _ in engine.generate([5, 6, 7], _params(engine, 3, prompt_len=3), "one"):
            pass
        await engine.shutdown(timeout=5)

    asyncio.run(main())
    assert len(seen["build"]) == 1 and seen["build"] == seen["step"]
    assert threading.get_ident() not in seen["build"]
    assert not engine._thread.is_alive()  # shutdown ends the thread too


def test_a_failed_build_raises_and_leaves_no_thread(tmp_path):
    import threading

    def engine_threads():
        return {t for t in threading.enumerate() if t.name == "tokenmill-engine"}

    before = engine_threads()
    with pytest.raises(Exception, match="does not exist"):
        AsyncEngine.from_config(EngineConfig(model=str(tmp_path / "missing.gguf"), device="cpu"))
    for t in engine_threads() - before:
        t.join(5)
    assert engine_threads() - before == set()
