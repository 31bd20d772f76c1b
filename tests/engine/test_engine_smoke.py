"""A first end-to-end run of the in-process engine."""

from __future__ import annotations

import asyncio

from engine_helpers import produce, reading, transactions, wait_committed

from fraudactors.engine.engine import Engine
from fraudactors.settings import Settings


async def test_a_few_transactions_are_decided_and_committed(engine_settings: Settings) -> None:
    s = engine_settings
    engine = Engine(s)
    await engine.start()
    try:
        await engine.wait_ready(timeout_s=60)
        txns = transactions(500)
        async with reading(s, s.topics.predictions) as reader:
            ends = await produce(s, [(k, v) for k, v, _ in txns])
            await reader.wait_for(lambda recs: len(recs) >= 500, timeout_s=60)
            decided = reader.decisions()
        assert {d["transaction_id"] for d in decided} == {t for _, _, t in txns}
        commits = await wait_committed(s, ends, timeout_s=30)
        assert all(commits.get(p) == end for p, end in ends.items()), (commits, ends)
    finally:
        await engine.stop()
    await asyncio.sleep(0)
