"""Publishing requests: what a client of stampflow does, and what `stampflow submit` uses."""

from __future__ import annotations

import base64
from types import TracebackType
from typing import Any
from uuid import UUID

from aiokafka import AIOKafkaProducer

from stampflow.bus import ensure_topics, make_producer
from stampflow.contracts.events import (
    Envelope,
    GenerationRequested,
    StampRequested,
    envelope_for,
    new_event_id,
)
from stampflow.errors import StampflowError
from stampflow.services import Endpoints
from stampflow.settings import Settings


class Client:
    """``async with Client(settings, endpoints) as c: await c.submit_stamp("ns", path=...)``"""

    def __init__(self, settings: Settings, endpoints: Endpoints, source: str = "client") -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.source = source
        self._producer: AIOKafkaProducer | _NotConnected = _NotConnected()

    async def __aenter__(self) -> Client:
        s = self.settings
        await ensure_topics(self.endpoints.bootstrap_servers,
                            [s.requests_topic, s.events_topic], s.topic_partitions,
                            replication_factor=s.topic_replication_factor,
                            kafka=self.endpoints.kafka)
        producer = make_producer(self.endpoints.bootstrap_servers, kafka=self.endpoints.kafka)
        await producer.start()
        self._producer = producer
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()
        self._producer = _NotConnected()

    async def submit(self, namespace: str, payload: Any, *, event_id: UUID | None = None,
                     wait: bool = True) -> Envelope:
        event_id = event_id or new_event_id()
        envelope = envelope_for(payload, namespace=namespace, event_id=event_id,
                                correlation_id=event_id, causation_id=None, source=self.source)
        delivery = await self._producer.send(self.settings.requests_topic,
                                             value=envelope.to_bytes(), key=envelope.key())
        if wait:
            await delivery
        return envelope

    async def submit_stamp(self, namespace: str, *, path: str | None = None,
                           content: bytes | None = None, content_type: str | None = None,
                           event_id: UUID | None = None, wait: bool = True) -> UUID:
        encoded = base64.b64encode(content) if content is not None else None
        payload = StampRequested(path=path, content=encoded, content_type=content_type)
        return (await self.submit(namespace, payload, event_id=event_id, wait=wait)).event_id

    async def submit_generation(self, namespace: str, request: GenerationRequested, *,
                                event_id: UUID | None = None) -> UUID:
        return (await self.submit(namespace, request, event_id=event_id)).event_id

    async def publish_raw(self, value: bytes, key: bytes | None, *, wait: bool = True) -> None:
        """Publish bytes as they are (tests of malformed input use this)."""
        delivery = await self._producer.send(self.settings.requests_topic, value=value, key=key)
        if wait:
            await delivery

    async def flush(self) -> None:
        await self._producer.flush()


class _NotConnected:
    """The producer before ``async with Client(...)``: every use says so, clearly."""

    def __getattr__(self, name: str) -> Any:
        raise StampflowError("the client is not connected: use `async with Client(...)`")
