"""What both runners do with their consumer besides fetching: commit offsets, bounded in time
and abandoned on stop, and report the lag behind each partition's end.

A commit that fails is never fatal. The work is durable (the orchestrator's events are
acknowledged, the reducer's batch is committed in PostgreSQL), so records whose commit was
lost are re-delivered and, their ids being deterministic, counted once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from stampflow.nodes.metrics import CONSUMER_LAG
from stampflow.nodes.resilience import Stopping, unless_stopped

log = structlog.get_logger("stampflow.consuming")

COMMIT_TIMEOUT_S = 10.0


async def commit_offsets(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int], *,
                         stop: asyncio.Event, group_id: str, call_s: float) -> bool:
    """Commit ``offsets`` (the next offset to read, per partition) and report the lag; True
    when the group has them. With the coordinator unreachable a commit would wait for it
    indefinitely, so it is bounded: 10 s while running, abandoned as soon as a stop comes, and
    one try of ``call_s`` once stopping (the way out commits what finished)."""
    committed = False
    try:
        if stop.is_set():
            await asyncio.wait_for(consumer.commit(dict(offsets)), call_s)
        else:
            await unless_stopped(stop, lambda: consumer.commit(dict(offsets)),
                                 timeout=COMMIT_TIMEOUT_S, unwind_s=call_s)
        committed = True
    except Stopping:
        return False
    except CommitFailedError as err:
        # The group moved on (a rebalance): the new owner re-runs these records.
        log.warning("offset commit refused by the group; its records will be re-delivered",
                    error=str(err), throttle=True)
    except (KafkaError, TimeoutError) as err:
        log.warning("offset commit failed; the next one will carry it",
                    error=str(err) or type(err).__name__, throttle=True)
    report_lag(consumer, offsets, group_id)
    return committed


def report_lag(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int],
               group_id: str) -> None:
    """``stampflow_consumer_lag``: records between each committed offset and the partition's
    end as last fetched (unknown until something was fetched from it)."""
    for tp, offset in offsets.items():
        high = consumer.highwater(tp)
        if high is not None:
            CONSUMER_LAG.labels(group_id, tp.topic, str(tp.partition)).set(max(0, high - offset))
