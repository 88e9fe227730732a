"""The orchestrator's one in-process effect as its command interpreter calls it: stamping (the
compute node, off the event loop when the work is large, within the contract's timeout). It
returns an :class:`Outcome` for the pure core; a failure of the work is an outcome too, never
an exception. Generation is not in process: the inference node takes it as a job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from stampflow.contracts.events import StampRequested
from stampflow.nodes.orchestrator.commands import EffectFailed, Outcome, StampSucceeded
from stampflow.nodes.stamping import StampError, StampingNode

# Inline content up to this size is hashed on the event loop (faster than a thread hop).
INLINE_ON_LOOP_BYTES = 256 * 1024


class Effects:
    """Stamping for one orchestrator."""

    def __init__(self, stamping: StampingNode, *, timeout_s: float,
                 clock: Callable[[], datetime]) -> None:
        self.stamping = stamping
        self.timeout_s = timeout_s
        self.clock = clock

    async def stamp(self, request: StampRequested, namespace: str) -> Outcome:
        timeout = self.timeout_s
        try:
            if request.path is not None:
                stamp = await asyncio.wait_for(
                    asyncio.to_thread(self.stamping.stamp_path, request.path,
                                      namespace=namespace), timeout)
            else:
                data = request.content or b""
                if len(data) > INLINE_ON_LOOP_BYTES:
                    stamp = await asyncio.wait_for(asyncio.to_thread(
                        self.stamping.stamp_bytes, data, namespace=namespace,
                        content_type=request.content_type), timeout)
                else:
                    stamp = self.stamping.stamp_bytes(data, namespace=namespace,
                                                      content_type=request.content_type)
        except StampError as err:
            return EffectFailed(err.code, str(err), self.clock())
        except TimeoutError:
            return EffectFailed("timeout", f"stamping took longer than {timeout:.1f}s",
                                self.clock())
        return StampSucceeded(stamp.hash, stamp.size, stamp.content_type, stamp.stamped_at,
                              self.clock())
