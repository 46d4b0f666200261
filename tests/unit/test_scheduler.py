"""The scheduler over the KV block manager, driven by a fake engine loop: no model, no torch.

``Sim`` plays the engine: schedule, "compute" (checking every invariant on the way, and keeping a
shadow copy of what each KV slot holds), ``update``, append a fake sampled token to each request
that samples, and ``finish`` a request once it has its ``max_tokens``.
"""

from __future__ import annotations

import random

import pytest

import tokenmill.generation.kv_manager as kv_manager
from tokenmill.generation.kv_manager import KVCacheManager, cdiv
from tokenmill.generation.request import Request, RequestStatus
from tokenmill.generation.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


class Sim:
    """A fake engine. Request k (counting from 1) samples 100*k, 100*k + 1, ... unless
    ``token_fn`` says otherwise; the token depends only on the request and its position,
    so recomputing after a preemption must not change what a request ends up with."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        token_fn=None,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens)
        self.sched = Scheduler(self.config, self.kv)
        self.token_fn = token_fn or (lambda k, i: 100 * k + i)
        self.reqs: dict[str, Request] = {}
        self.max_tokens: dict[str, int] = {}
        self.index: dict[str, int] = {}
        self.num_samples: dict[str, int] = {}
        self.finished: list[str] = []
        self.outputs: list[SchedulerOutput] = []
        #: (block id, slot) -> the token ids whose last token's keys and values the slot holds
        self.content: dict[tuple[int, int], tuple[int, ...]] = {}

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> Request:
        req = Request(request_id, list(prompt), len(prompt))
        self.reqs[request_id] = req
        self.max_tokens[request_id] = max_tokens
        self.index[request_id] = len(self.index) + 1
        self.num_samples[request_id] = 0
        self.sched.add(req)
        return req

    def expected(self, request_id: str) -> list[int]:
        req, k = self.reqs[request_id], self.index[request_id]
        prompt = req.all_token_ids[: req.num_prompt_tokens]
        return prompt + [self.token_fn(k, i) for i in range(self.max_tokens[request_id])]

    def step(self) -> list[tuple[str, int, bool]]:
        """One engine step; returns (request id, tokens computed, samples) per scheduled request."""
        sched, kv, bs = self.sched, self.kv, self.kv.block_size
        running_before = list(sched.running)
        out = sched.schedule()
        self.outputs.append(out)
        self._check(out, running_before)
        for s in out.scheduled:
            req, c = s.request, s.request.num_computed_tokens
            table = kv.block_ids(req.request_id)
            ids = req.all_token_ids
            # What was computed before (by this request, or found in the prefix cache) must
            # be exactly the keys and values of this request's own prefix.
            for pos in range(c):
                assert self.content.get((table[pos // bs], pos % bs)) == tuple(ids[: pos + 1]), (
                    f"{req.request_id} reads wrong KV at position {pos}"
                )
            for pos in range(c, c + s.num_new_tokens):
                block = kv.pool.blocks[table[pos // bs]]
                assert block.ref_cnt == 1 and block.block_hash is None, "write into a shared block"
                self.content[(block.block_id, pos % bs)] = tuple(ids[: pos + 1])
        sched.update(out)
        for s in out.scheduled:
            req = s.request
            assert req.num_computed_tokens <= req.num_tokens
            if not s.samples:
                assert req.num_computed_tokens < req.num_tokens
                continue
            assert req.num_computed_tokens == req.num_tokens
            req.append_token(self.token_fn(self.index[req.request_id], req.num_output_tokens))
            self.num_samples[req.request_id] += 1
            if req.num_output_tokens == self.max_tokens[req.request_id]:
                sched.finish(req)
                assert req.status is RequestStatus.FINISHED
                self.finished.append(req.request_id)
        self._check_pool()
        return [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled]

    def run(self, max_steps: int = 1000) -> list[list[tuple[str, int, bool]]]:
        trace = []
        while self.sched.has_unfinished():
            trace.append(self.step())
            assert len(trace) < max_steps, "no progress"
        return trace

    def _check(self, out: SchedulerOutput, running_before: list[Request]) -> None:
        sched, kv, cfg = self.sched, self.kv, self.config
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        assert [s.request for s in out.scheduled] == sched.running[: len(out.scheduled)]
        for s in out.scheduled:
            req = s.request
            assert s.num_new_tokens >= 1 and req.status is RequestStatus.RUNNING
            assert s.samples == (req.num_computed_tokens + s.num_new_tokens == req.num_tokens)
            assert len(kv.block_ids(req.request_id)) == cdiv(
                req.num_computed_tokens + s.num_new_tokens, kv.block_size
            )
        for req in out.preempted:
            assert req.status is RequestStatus.PREEMPTED and req.num_computed_tokens == 0
            assert kv.block_ids(req.request_id) == [] and req in sched.waiting
            assert req in running_before
        if out.preempted:
            # Nothing admitted in a step that had to preempt.
            assert all(s.request in running_before for s in out.scheduled)
            assert out.first_scheduled == [] and out.prefix_queries == 0

    def _check_pool(self) -> None:
        kv, pool = self.kv, self.kv.pool
        held = [b for r in self.sched.running for b in kv.block_ids(r.request_id)]
        assert sum(b.ref_cnt for b in pool.blocks) == len(held)
        assert pool.num_used == len(set(held)) == sum(1 for b in pool.blocks if b.ref_cnt)
        assert pool.num_used + pool.num_free == pool.num_blocks
        for r in self.sched.waiting:
            assert kv.block_ids(r.request_id) == []


# -- configuration ---------------------------------------------------------------------------


def test_config_defaults():
    cfg = SchedulerConfig()
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (64, 512, 2048)


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0, "4", None])
def test_config_rejects_bad_values_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= 1, got {value!r}$"):
        SchedulerConfig(**{name: value})


def test_config_accepts_one():
    cfg = SchedulerConfig(1, 1, 1)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (1, 1, 1)


# -- one request ---------------------------------------------------------------------------------


def test_one_request_prefills_then_decodes():
    sim = Sim(8, 4)
    a = sim.add("a", [1, 2, 3, 4, 5], 3)
    assert (sim.sched.num_waiting, sim.sched.num_running, sim.sched.has_unfinished()) == (1, 0, True)
    assert sim.step() == [("a", 5, True)]
    assert sim.kv.block_ids("a") == [0, 1]
    assert a.num_computed_tokens == 5 and a.all_token_ids == [1, 2, 3, 4, 5, 100]
    assert (sim.sched.num_waiting, sim.sched.num_running) == (0, 1)
    out = sim.outputs[-1]
    assert (out.num_batched_tokens, out.prefix_queries, out.prefix_hits) == (5, 5, 0)
    assert out.first_scheduled == [a] and out.preempted == []
    assert sim.step() == [("a", 1, True)]
    assert sim.outputs[-1].first_scheduled == [] and sim.outputs[-1].prefix_queries == 0
    assert sim.step() == [("a", 1, True)]
    assert a.all_token_ids == [1, 2, 3, 4, 5, 100, 101, 102]
    assert a.num_output_tokens == 3 and a.status is RequestStatus.FINISHED
    assert sim.sched.has_unfinished() is False
    # 7 of its 8 tokens were computed: only the block [1, 2, 3, 4] is full, and stays cached.
    assert (sim.kv.pool.num_used, sim.kv.pool.num_cached) == (0, 1)
    assert sim.sched.schedule().empty


def test_empty_schedule():
    sim = Sim(4, 2)
    out = sim.sched.schedule()
    assert out.empty and out.num_batched_tokens == 0 and out.scheduled == [] and out.preempted == []


# -- budgets -------------------------------------------------------------------------------------


def test_running_requests_take_the_budget_first_and_waiting_ones_get_the_rest():
    sim = Sim(64, 4, max_num_batched_tokens=10)
    for name in "abc":
        sim.add(name, [1, 2], 10)
    assert sim.step() == [("a", 2, True), ("b", 2, True), ("c", 2, True)]
    assert sim.outputs[-1].num_batched_tokens == 6
    d = sim.add("d", list(range(20, 40)), 1)
    assert sim.step() == [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 7, False)]
    assert sim.outputs[-1].num_batched_tokens == 10
    assert d.num_computed_tokens == 7 and d.num_output_tokens == 0
    assert sim.kv.block_ids("d") == [3, 4]
    assert sim.step() == [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 7, False)]
    assert d.num_computed_tokens == 14 and len(sim.kv.block_ids("d")) == 4
    assert sim.step() == [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 6, True)]
    assert sim.outputs[-1].num_batched_tokens == 9
    assert d.status is RequestStatus.FINISHED and d.all_token_ids == list(range(20, 40)) + [400]


def test_running_requests_can_use_up_the_budget():
    sim = Sim(16, 4, max_num_batched_tokens=2)
    for name in "abc":
        sim.add(name, [7], 2)
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    assert sim.sched.num_waiting == 1
    # a and b finish here; c could not start while they took the whole budget.
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    assert sim.finished == ["a", "b"]
    assert sim.step() == [("c", 1, True)]
    assert sim.step() == [("c", 1, True)]
    assert not sim.sched.has_unfinished()


def test_a_long_prefill_takes_the_budget_from_later_arrivals():
    sim = Sim(16, 4, max_num_batched_tokens=4)
    sim.add("a", list(range(1, 11)), 1)
    sim.add("b", [50], 1)
    assert sim.run() == [[("a", 4, False)], [("a", 4, False)], [("a", 2, True), ("b", 1, True)]]


def test_max_num_seqs_caps_the_running_requests():
    sim = Sim(16, 4, max_num_seqs=2)
    sim.add("a", [1, 2, 3], 1)
    sim.add("b", [4, 5, 6], 3)
    c = sim.add("c", [7, 8, 9], 1)
    assert sim.step() == [("a", 3, True), ("b", 3, True)]
    assert (c.status, sim.sched.num_running, sim.sched.num_waiting) == (RequestStatus.WAITING, 1, 1)
    assert sim.step() == [("b", 1, True), ("c", 3, True)]
    assert sim.step() == [("b", 1, True)]
    assert sim.finished == ["a", "c", "b"]


def test_max_num_seqs_one_runs_requests_one_at_a_time():
    sim = Sim(16, 2, max_num_seqs=1)
    sim.add("a", [1, 2, 3], 2)
    sim.add("b", [4, 5], 2)
    assert sim.run() == [[("a", 3, True)], [("a", 1, True)], [("b", 2, True)], [("b", 1, True)]]
    assert sim.reqs["a"].all_token_ids == [1, 2, 3, 100, 101]
    assert sim.reqs["b"].all_token_ids == [4, 5, 200, 201]


def test_admission_is_first_come_first_served():
    sim = Sim(5, 2)
    sim.add("big", [1, 2, 3, 4, 5, 6], 2)  # 3 blocks, then 4
    sim.add("a", [7, 8, 9, 10, 11], 1)  # needs 3
    b = sim.add("b", [9], 1)  # needs 1
    # b would fit in the blocks left over, but waits behind a, which does not.
    assert sim.step() == [("big", 6, True)]
    assert sim.kv.pool.num_free == 2 and b.status is RequestStatus.WAITING
    assert sim.step() == [("big", 1, True)]
    assert sim.finished == ["big"]
    assert sim.step() == [("a", 5, True), ("b", 1, True)]


# -- chunked prefill -----------------------------------------------------------------------------


def test_chunked_prefill_shares_steps_with_decodes():
    sim = Sim(16, 4, max_num_batched_tokens=6)
    d = sim.add("d", [1, 2], 5)
    long = sim.add("long", list(range(10, 23)), 2)  # 13 tokens
    blocks = []
    trace = []
    while sim.sched.has_unfinished():
        trace.append(sim.step())
        blocks.append((len(sim.kv.block_ids("d")), len(sim.kv.block_ids("long"))))
    assert trace == [
        [("d", 2, True), ("long", 4, False)],
        [("d", 1, True), ("long", 5, False)],
        [("d", 1, True), ("long", 4, True)],
        [("d", 1, True), ("long", 1, True)],
        [("d", 1, True)],
    ]
    assert [o.num_batched_tokens for o in sim.outputs] == [6, 6, 5, 2, 1]
    # Blocks held after each step (a finished request holds none).
    assert blocks == [(1, 1), (1, 3), (1, 4), (2, 0), (0, 0)]
    assert [o.first_scheduled for o in sim.outputs] == [[d, long], [], [], [], []]
    assert long.all_token_ids == list(range(10, 23)) + [200, 201]
    assert d.all_token_ids == [1, 2, 100, 101, 102, 103, 104]
    assert sim.kv.pool.num_used == 0


def test_a_prompt_longer_than_the_budget_is_computed_in_budget_sized_chunks():
    sim = Sim(8, 4, max_num_batched_tokens=3)
    req = sim.add("a", list(range(10)), 1)
    computed = []
    while sim.sched.has_unfinished():
        sim.step()
        computed.append(req.num_computed_tokens)
    assert computed == [3, 6, 9, 10]
    chunks = [(o.scheduled[0].num_new_tokens, o.scheduled[0].samples) for o in sim.outputs]
    assert chunks == [(3, False), (3, False), (3, False), (1, True)]
    assert sim.num_samples["a"] == 1


# -- prefix caching through the scheduler --------------------------------------------------------


def test_a_later_request_skips_its_cached_prefix():
    sim = Sim(16, 4)
    a = sim.add("a", list(range(1, 11)), 5)
    sim.step()
    b = sim.add("b", list(range(1, 9)) + [20, 21], 2)
    assert sim.step() == [("a", 1, True), ("b", 2, True)]
    out = sim.outputs[-1]
    assert (out.prefix_queries, out.prefix_hits) == (10, 8)
    assert out.first_scheduled == [b] and b.num_cached_tokens == 8
    assert sim.kv.block_ids("a") == [0, 1, 2]
    assert sim.kv.block_ids("b") == [0, 1, 3]
    assert [sim.kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    assert b.status is RequestStatus.FINISHED and b.all_token_ids == list(range(1, 9)) + [20, 21, 200, 201]
    # b is done; a still holds the shared blocks.
    assert [sim.kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 1, 0]
    assert sim.kv.pool.num_used == 3
    sim.run()
    assert a.all_token_ids == list(range(1, 11)) + [100, 101, 102, 103, 104]
    assert a.num_cached_tokens == 0


def test_an_identical_prompt_still_computes_its_last_block():
    sim = Sim(16, 4)
    sim.add("a", list(range(1, 9)), 1)
    sim.step()
    b = sim.add("b", list(range(1, 9)), 1)
    assert sim.step() == [("b", 4, True)]
    assert (sim.outputs[-1].prefix_queries, sim.outputs[-1].prefix_hits) == (8, 4)
    assert b.num_cached_tokens == 4


def test_same_prompt_in_the_same_step_is_computed_twice_then_shared():
    sim = Sim(16, 2)
    sim.add("a", [1, 2, 3, 4, 5], 1)
    sim.add("b", [1, 2, 3, 4, 5], 1)
    assert sim.step() == [("a", 5, True), ("b", 5, True)]
    assert sim.outputs[-1].prefix_hits == 0
    assert sim.finished == ["a", "b"]
    c = sim.add("c", [1, 2, 3, 4, 5], 2)
    assert sim.step() == [("c", 1, True)]
    # a's blocks are the cached copies; b's duplicates, freed uncached, are handed out first.
    assert c.num_cached_tokens == 4 and sim.kv.block_ids("c") == [0, 1, 3]


def test_prefix_caching_off_never_hits():
    sim = Sim(16, 4, enable_prefix_caching=False)
    sim.add("a", list(range(1, 11)), 1)
    sim.step()
    sim.add("b", list(range(1, 11)), 1)
    assert sim.step() == [("b", 10, True)]
    assert sim.outputs[-1].prefix_hits == 0 and sim.kv.pool.num_cached == 0


# -- preemption ----------------------------------------------------------------------------------


def test_the_newest_running_request_is_preempted_and_recomputed():
    sim = Sim(6, 2)
    a = sim.add("a", [1, 2, 3], 3)
    b = sim.add("b", [4, 5, 6], 3)
    c = sim.add("c", [7, 8, 9], 3)
    assert sim.step() == [("a", 3, True), ("b", 3, True), ("c", 3, True)]
    assert sim.kv.pool.num_free == 0
    assert sim.step() == [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    # a needs a third block: c, the newest, gives up its two; a and b each take one.
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    out = sim.outputs[-1]
    assert out.preempted == [c]
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert sim.sched.num_preemptions == 1
    assert list(sim.sched.waiting) == [c] and sim.kv.block_ids("c") == []
    assert (a.num_preemptions, b.num_preemptions) == (0, 0)
    assert sim.finished == ["a", "b"]
    # c is recomputed from its prompt and the two tokens it had sampled, then samples its third.
    assert sim.step() == [("c", 5, True)]
    assert sim.outputs[-1].prefix_hits == 0  # a and b took both of c's cached blocks
    assert sim.outputs[-1].first_scheduled == []  # counted once, on its first schedule
    assert c.all_token_ids == [7, 8, 9, 300, 301, 302]
    assert not sim.sched.has_unfinished() and sim.kv.pool.num_used == 0
    assert sim.num_samples == {"a": 3, "b": 3, "c": 3}


def test_preemption_then_resume_from_own_cached_prefix():
    sim = Sim(4, 2)
    a = sim.add("a", [1, 2, 3], 4)
    b = sim.add("b", [4, 5, 6], 4)
    assert sim.step() == [("a", 3, True), ("b", 3, True)]
    assert sim.kv.block_ids("a") == [0, 1] and sim.kv.block_ids("b") == [2, 3]
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    # a needs a block: b is preempted; a takes b's tail block (the least recently freed).
    assert sim.step() == [("a", 1, True)]
    assert sim.outputs[-1].preempted == [b]
    assert sim.kv.block_ids("a") == [0, 1, 3]
    # b finds its first block [4, 5] again, but needs two new ones and only one is free.
    assert sim.step() == [("a", 1, True)]
    assert b.status is RequestStatus.PREEMPTED and a.status is RequestStatus.FINISHED
    assert a.all_token_ids == [1, 2, 3, 100, 101, 102, 103]
    assert sim.step() == [("b", 3, True)]
    out = sim.outputs[-1]
    assert (out.prefix_queries, out.prefix_hits) == (5, 2)
    assert sim.kv.block_ids("b") == [2, 3, 1]
    assert b.num_cached_tokens == 0  # set on the first schedule only
    assert sim.step() == [("b", 1, True)]
    assert b.all_token_ids == [4, 5, 6, 200, 201, 202, 203]
    assert (sim.sched.num_preemptions, b.num_preemptions) == (1, 1)
    assert sim.kv.pool.num_used == 0
    # a's blocks survive in the cache where b did not take them.
    assert [blk.block_id for blk in sim.kv.find_cached_prefix(Request("c", [1, 2, 3], 3))] == [0]


def test_no_request_is_admitted_in_a_step_that_preempted():
    sim = Sim(4, 2, max_num_batched_tokens=2, enable_prefix_caching=False)
    a = sim.add("a", [1, 2, 3], 4)
    b = sim.add("b", [4, 5, 6], 2)
    assert sim.step() == [("a", 2, False)]
    assert sim.step() == [("a", 1, True), ("b", 1, False)]
    assert sim.step() == [("a", 1, True), ("b", 1, False)]
    # a takes the last free block; b, the newest, can't grow and preempts itself. Its chunk of
    # one token would fit in the block it gave back, but it is not readmitted in this step.
    assert sim.step() == [("a", 1, True)]
    out = sim.outputs[-1]
    assert out.preempted == [b] and out.num_batched_tokens == 1
    assert sim.kv.pool.num_free == 1 and list(sim.sched.waiting) == [b]
    assert sim.step() == [("a", 1, True), ("b", 1, False)]
    assert sim.step() == [("b", 2, True)]
    assert sim.step() == [("b", 1, True)]
    assert a.all_token_ids == [1, 2, 3, 100, 101, 102, 103]
    assert b.all_token_ids == [4, 5, 6, 200, 201]
    assert sim.sched.num_preemptions == 1 and sim.kv.pool.num_used == 0


def test_the_only_running_request_preempts_itself_when_it_cannot_grow():
    sim = Sim(2, 2)
    a = sim.add("a", [1, 2, 3], 5)
    assert sim.step() == [("a", 3, True)]
    assert sim.step() == [("a", 1, True)]
    out = sim.sched.schedule()  # 5 tokens need 3 blocks of 2; the pool has 2
    assert out.empty and out.preempted == [a]
    assert a.status is RequestStatus.PREEMPTED and list(sim.sched.waiting) == [a]
    assert sim.kv.pool.num_used == 0 and sim.sched.num_preemptions == 1
    # It can never fit again; it stays waiting, holding nothing.
    out = sim.sched.schedule()
    assert out.empty and out.preempted == [] and sim.kv.pool.num_used == 0
    sim.sched.finish(a)
    assert not sim.sched.has_unfinished()


def test_several_victims_in_one_step():
    sim = Sim(5, 2)
    sim.add("a", [1, 2, 3, 4], 2)
    sim.add("b", [5, 6], 3)
    c = sim.add("c", [6], 3)
    d = sim.add("d", [7], 3)
    assert sim.step() == [("a", 4, True), ("b", 2, True), ("c", 1, True), ("d", 1, True)]
    assert sim.kv.pool.num_free == 0
    # a needs one block, b needs one too: d goes for a, c for b.
    assert sim.step() == [("a", 1, True), ("b", 1, True)]
    assert sim.outputs[-1].preempted == [d, c]
    assert list(sim.sched.waiting) == [c, d]  # the older one first
    assert sim.sched.num_preemptions == 2
    assert sim.finished == ["a"]  # a has its 2 tokens and gave back blocks 0, 1 and 4
    assert sim.kv.block_ids("b") == [2, 3]  # block 3 was c's
    assert sim.step() == [("b", 1, True), ("c", 2, True), ("d", 2, True)]
    assert sim.step() == [("c", 1, True), ("d", 1, True)]
    assert sim.finished == ["a", "b", "c", "d"]
    for name in "abcd":
        assert sim.reqs[name].all_token_ids == sim.expected(name)
    assert sim.kv.pool.num_used == 0


def test_engine_loop_under_memory_pressure_gives_every_request_its_exact_tokens():
    sim = Sim(10, 2, max_num_seqs=4, max_num_batched_tokens=7)
    prompts = {
        "a": [1, 2, 3, 4, 5],
        "b": [1, 2, 3, 4, 6, 7],
        "c": [8],
        "d": [1, 2, 3, 4, 5, 9, 9],
        "e": [2, 2, 2],
        "f": [1, 2],
    }
    max_tokens = {"a": 6, "b": 4, "c": 9, "d": 3, "e": 7, "f": 5}
    for name, prompt in prompts.items():
        sim.add(name, prompt, max_tokens[name])
    sim.run()
    assert sorted(sim.finished) == sorted(prompts)
    for name in prompts:
        req = sim.reqs[name]
        assert req.all_token_ids == sim.expected(name)
        assert req.num_output_tokens == max_tokens[name] == sim.num_samples[name]
        assert req.status is RequestStatus.FINISHED
    assert sim.sched.num_preemptions > 0
    assert sim.sched.num_preemptions == sum(len(o.preempted) for o in sim.outputs)
    assert sim.sched.num_preemptions == sum(r.num_preemptions for r in sim.reqs.values())
    assert sum(o.prefix_hits for o in sim.outputs) > 0
    assert sim.kv.pool.num_used == 0 and sim.kv._blocks == {} and sim.kv._hashes == {}


# -- finishing and aborting ----------------------------------------------------------------------


def test_abort_a_waiting_request():
    sim = Sim(8, 2, max_num_seqs=1)
    sim.add("a", [1, 2, 3], 5)
    b = sim.add("b", [4, 5], 5)
    sim.step()
    assert list(sim.sched.waiting) == [b]
    sim.sched.finish(b)
    assert b.status is RequestStatus.FINISHED
    assert list(sim.sched.waiting) == [] and sim.sched.num_running == 1
    assert sim.kv.block_ids("b") == [] and sim.kv.pool.num_used == 2


def test_abort_a_running_request_mid_prefill_frees_its_blocks():
    sim = Sim(8, 2, max_num_batched_tokens=4)
    a = sim.add("a", list(range(1, 10)), 5)
    sim.step()
    assert a.num_computed_tokens == 4 and sim.kv.block_ids("a") == [0, 1]
    assert sim.kv.pool.num_used == 2
    sim.sched.finish(a)
    assert a.status is RequestStatus.FINISHED and sim.sched.running == []
    assert sim.kv.block_ids("a") == [] and sim.kv.pool.num_used == 0
    assert sim.kv.pool.num_cached == 2  # its computed full blocks remain findable
    assert sim.sched.schedule().empty


def test_abort_a_preempted_request():
    sim = Sim(4, 2)
    sim.add("a", [1, 2, 3], 4)
    b = sim.add("b", [4, 5, 6], 4)
    sim.step()
    sim.step()
    sim.step()
    assert b.status is RequestStatus.PREEMPTED
    sim.sched.finish(b)
    assert b.status is RequestStatus.FINISHED and list(sim.sched.waiting) == []
    sim.run()
    assert sim.kv.pool.num_used == 0


def test_finishing_one_of_two_sharing_requests_keeps_the_shared_blocks():
    sim = Sim(8, 4)
    a = sim.add("a", list(range(1, 10)), 10)
    sim.step()
    b = sim.add("b", list(range(1, 9)) + [30], 10)
    sim.step()
    assert sim.kv.block_ids("a")[:2] == sim.kv.block_ids("b")[:2] == [0, 1]
    assert [sim.kv.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    assert sim.kv.pool.num_used == 4
    sim.sched.finish(a)
    assert [sim.kv.pool.blocks[i].ref_cnt for i in (0, 1)] == [1, 1]
    assert sim.kv.pool.num_used == 3  # a's own tail block went back
    sim.sched.finish(b)
    assert sim.kv.pool.num_used == 0 and not sim.sched.has_unfinished()


# -- hash collisions through the whole loop ----------------------------------------------------


def test_collision_with_a_reused_parent_never_serves_wrong_kv(monkeypatch):
    """Regression, through the scheduler: see the same case in test_block_pool.py."""
    monkeypatch.setattr(kv_manager, "chain_hash", lambda parent, tokens: hash(tokens))
    sim = Sim(4, 4, max_num_batched_tokens=13)
    sim.add("q", [1, 2, 3, 4, 9, 9, 9, 9, 0], 1)
    r = sim.add("r", [1, 2, 3, 4, 5, 6, 7, 8, 0], 1)
    # q computes its prompt and r only its first block; r's copy collides with q's.
    assert sim.step() == [("q", 9, True), ("r", 4, False)]
    assert sim.kv.block_ids("r") == [3]
    w = sim.add("w", [7, 7, 7, 7], 1)
    # q's first block goes to w for other tokens while r computes its second block.
    assert sim.step() == [("r", 5, True), ("w", 4, True)]
    assert sim.outputs[-1].scheduled[0].request is r and sim.kv.pool.blocks[0].tokens == (7, 7, 7, 7)
    assert sim.finished == ["q", "r", "w"]
    u = sim.add("u", [7, 7, 7, 7, 5, 6, 7, 8, 0], 1)
    # Only w's [7, 7, 7, 7] may be reused; r's block 2 holds [5..8] after [1..4], not after [7..7].
    # (Sim also checks every slot u reads holds keys and values of u's own prefix.)
    assert sim.step() == [("u", 5, True)]
    assert (sim.outputs[-1].prefix_hits, u.num_cached_tokens) == (4, 4)
    assert w.all_token_ids == [7, 7, 7, 7, 300]


@pytest.mark.parametrize(
    "hash_fn",
    [
        pytest.param(None, id="real-hash"),
        pytest.param(lambda parent, tokens: hash(tokens), id="parent-blind"),
        pytest.param(lambda parent, tokens: sum(tokens) % 3, id="three-buckets"),
        pytest.param(lambda parent, tokens: 0, id="constant"),
    ],
)
@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_finish_exactly_and_never_read_wrong_kv(monkeypatch, hash_fn, seed):
    if hash_fn is not None:
        monkeypatch.setattr(kv_manager, "chain_hash", hash_fn)
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4])
    num_blocks = 24 // block_size + rng.randint(2, 6)
    sim = Sim(
        num_blocks,
        block_size,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(1, 16),
        token_fn=lambda k, i: (3 * k + i) % 3,  # few distinct tokens: many shared blocks
    )
    stems = [[rng.randint(0, 2) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    arrivals = []
    for k in range(rng.randint(3, 10)):
        prompt = rng.choice(stems) + [rng.randint(0, 2) for _ in range(rng.randint(0, 5))]
        arrivals.append((rng.randint(0, 8), f"r{k}", prompt, rng.randint(1, 8)))
    aborted = set()
    steps = 0
    while arrivals or sim.sched.has_unfinished():
        for item in [x for x in arrivals if x[0] <= steps]:
            arrivals.remove(item)
            sim.add(*item[1:])
        if sim.sched.has_unfinished() and rng.random() < 0.05:
            victim = rng.choice(list(sim.sched.waiting) + sim.sched.running)
            sim.sched.finish(victim)
            aborted.add(victim.request_id)
        sim.step()
        steps += 1
        assert steps < 2000
    assert sim.kv.pool.num_used == 0
    assert sim.sched.num_preemptions == sum(r.num_preemptions for r in sim.reqs.values())
    for name, req in sim.reqs.items():
        if name in aborted:
            assert req.all_token_ids == sim.expected(name)[: req.num_tokens]
        else:
            assert req.all_token_ids == sim.expected(name)
            assert sim.num_samples[name] == sim.max_tokens[name]
