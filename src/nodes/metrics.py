"""The Prometheus metrics the nodes report. Defined with the nodes that update them; the runtime's
health server (stampflow.observability.HealthServer) serves the default registry they live in.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WORKFLOWS = Counter(
    "stampflow_workflows_total", "Workflows that reached a terminal state", ["kind", "state"]
)
WORKFLOWS_IN_FLIGHT = Gauge("stampflow_workflows_in_flight", "Workflows being run right now")
WORKFLOW_LATENCY = Histogram(
    "stampflow_workflow_latency_seconds", "Request published to workflow finished", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TRANSITION_SECONDS = Histogram(
    "stampflow_fsm_transition_seconds", "Time the pure core spends per FSM transition",
    buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1),
)
TRANSITIONS = Counter("stampflow_transitions_total", "FSM transitions taken", ["kind", "to_state"])
REDUCER_BATCH = Histogram(
    "stampflow_reducer_batch_size", "Events per reducer batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
REDUCER_EVENTS = Counter("stampflow_reducer_events_total", "Events seen by the reducer", ["result"])
CONSUMER_LAG = Gauge("stampflow_consumer_lag", "Records behind the end of the partition",
                     ["group", "topic", "partition"])
DLQ_RECORDS = Counter("stampflow_dlq_records_total", "Records sent to a dead-letter topic",
                      ["topic"])
RETRIES = Counter("stampflow_retries_total", "Retried calls to a service", ["service"])
