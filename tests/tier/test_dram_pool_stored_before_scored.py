"""Issue 18's smoke at tier level: after a server has served reused work, a new conversation's pages must survive.

The wiring is the SGLang backend's (kvdrive_sglang/storage_backend.py, kvdrive_sglang/upkeep.py): selective write-down
with the promoter's admission, pages stored with ``score_of(chain=True)``, whole requests reported when they finish
(record_request, record_attention) and scores handed to the tiers at the report tick (push_scores). SGLang backs a
request's prompt pages up while the request still runs, so they reach the DRAM tier before the promoter knows them.

Found by bench/serving_bench.py --preset smoke --clients gsp,gsp_saturation,gsp_multiturn,agent (kvdrive served 0
tokens to the agent's later rounds, 640 on a fresh server): the agent's round-0 pages arrived with score 0.0 in a
DRAM tier full of scored pages, were each the first victim of their own insertion and, not admitted, were dropped.
"""

import time

import numpy as np

from kvdrive_sglang.cost_meter import ReloadMeter
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.index import Record, page_key
from kvdrive_sglang.tier.namespace import key_bytes
from kvdrive_sglang.tier.promoter import Promoter
from kvdrive_sglang.upkeep import Upkeep
from tests.helpers import small_page

PAGE_BYTES = small_page(0).nbytes  # 8 KiB raw
TOKENS = 16


class Server:
    """The tiers, promoter and upkeep of one kvdrive storage backend, driven as SGLang drives it."""

    def __init__(self, path, ns, clock):
        self.ns = ns
        self.promoter = Promoter(clock=clock)
        self.engine = TierEngine(
            TierConfig(path=str(path), host_bytes=25 * PAGE_BYTES, write_policy="selective", staging_bytes=0)
        )
        self.engine.admit = lambda ns_, key: self.promoter.admit(key.decode())
        self.upkeep = Upkeep(
            self.engine,
            self.promoter,
            ReloadMeter(),
            by_tenant=lambda keys: [(ns, list(range(len(keys))))],
            selective=True,
            read_only=False,
        )
        self.upkeep.bind(ns, TOKENS, PAGE_BYTES)
        self.seed = 0

    def store(self, keys):
        """SGLang's write-through of pages to storage (KvdriveStorage.batch_set_v1 / _put)."""
        self.upkeep.observe(keys, use=False)
        pages = [small_page(self.seed + i) for i in range(len(keys))]
        self.seed += len(keys)
        self.engine.put_many(self.ns, keys, pages, scores=self.promoter.score_of(keys, chain=True))

    def finish(self, keys, mass=0.05):
        """The request finished: kvdrive's radix cache reports its whole chain and its attention."""
        self.upkeep.record_request(keys)
        self.upkeep.record_attention({key: mass for key in keys})

    def written_down(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.engine.disk.stats().entries < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.engine.disk.stats().entries


def chain(name, n):
    return [f"{name}-{i}" for i in range(n)]


def test_a_conversation_stored_before_its_request_finished_survives_reused_older_work(tmp_path, ns):
    now = [1_000_000.0]
    srv = Server(tmp_path, ns, lambda: now[0])
    # gsp: three shared prefixes, each used by two requests (reused: admitted, written down at the tick)
    docs = [chain(f"doc{g}", 8) for g in range(3)]
    for doc in docs:
        srv.finish(doc)
        srv.store(doc)
        srv.finish(doc)
        now[0] += 1
    srv.upkeep.push_scores()
    assert srv.written_down(24) == 24
    filled = srv.engine.pool.stats()
    assert filled.used_bytes > 0.6 * filled.capacity_bytes  # with the conversation, past the pool's bound

    now[0] += 300  # 2.5 half-lives: the reused prefixes are now stale work
    # the agent's round 0: two conversations' prompts backed up while their requests run (the promoter does not
    # know these pages yet), a report tick meanwhile, then the requests finish and the next tick scores them
    convs = [chain(f"conv{c}", 10) for c in range(2)]
    for conv in convs:
        srv.store(conv)
    srv.upkeep.push_scores()
    for conv in convs:
        srv.finish(conv)
        now[0] += 1
    srv.upkeep.push_scores()

    # a flush empties SGLang's own pools; round 1 asks kvdrive for each conversation's history
    for conv in convs:
        assert srv.engine.exists_many(ns, conv) == len(conv), [str(t) for t in srv.engine.tiers_of(ns, conv)]
        outs = [np.empty_like(small_page(0)) for _ in conv]
        assert all(srv.engine.get_many(ns, conv, outs))

    # and newer work displaces the stale, on-disk pages first: they stay served, from disk
    now[0] += 300
    fresh = chain("conv9", 10)
    srv.finish(fresh)
    srv.store(fresh)
    for conv in convs:
        assert srv.engine.exists_many(ns, conv) == len(conv)
    for doc in docs:
        assert srv.engine.exists_many(ns, doc) == len(doc)
    assert srv.engine.stats().not_admitted_dropped == 0
    srv.engine.close()


def _disk_score(engine, ns, key):
    with engine.disk.index.read() as txn:
        return Record.unpack(txn.get(page_key(ns.id, key_bytes(key)), db=engine.disk.index.pages)).score


def test_a_report_tick_never_erases_the_score_a_page_kept_on_disk(tmp_path, ns):
    """After a restart the promoter knows nothing yet; a page served from disk is marked for scoring, and a tick before
    its request finishes asks the promoter for a score it does not have (0.0). That must not replace the score the
    disk kept for it (the lowest would make it the disk's first victim): 0.0 is no information."""
    now = [1_000_000.0]
    srv = Server(tmp_path, ns, lambda: now[0])
    doc = chain("doc", 4)
    srv.finish(doc)
    srv.store(doc)
    srv.finish(doc)
    srv.upkeep.push_scores()
    assert srv.written_down(4) == 4
    srv.engine.close()

    srv = Server(tmp_path, ns, lambda: now[0])  # the restart: a new promoter, the same store
    kept = _disk_score(srv.engine, ns, doc[0])
    assert kept > 0
    srv.upkeep.expect_whole_requests()  # kvdrive's radix cache reports whole requests
    outs = [np.empty_like(small_page(0)) for _ in doc]
    assert all(srv.engine.get_many(ns, doc, outs))
    srv.upkeep.observe(doc, use=True)  # KvdriveStorage.batch_get_v1: a storage hit, scored at the next tick
    srv.upkeep.push_scores()  # the tick, before the request finishes
    assert _disk_score(srv.engine, ns, doc[0]) == kept
    srv.engine.close()
