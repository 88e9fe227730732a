"""Fuzz the orchestrator's admission of raw records (10,000 cases in all, derandomized): every
input gets exactly one clear answer, and whatever the node then emits is itself valid."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stampflow.contracts.events import MAX_PROMPT_CHARS, NAMESPACE_PATTERN, REQUEST_TYPES, decode
from stampflow.contracts.nodes import builtin_contract
from stampflow.nodes.orchestrator.admission import Admitted, Refused, Unreadable, admit
from stampflow.nodes.orchestrator.core import Emit, Limits, OrchestratorCore
from stampflow.settings import Settings
from tests.fuzz import JSON, RECORDS, mutated_requests

CORE = OrchestratorCore(builtin_contract("orchestrator"), Limits(max_content_bytes=1 << 20))
AT = datetime(2026, 11, 23, tzinfo=UTC)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_one_clear_answer(raw: bytes) -> str:
    """The property: one of three answers; a refusal or a start emits only valid events."""
    answer = admit(raw)
    match answer:
        case Unreadable(reason=reason):
            assert reason and "\n" not in reason
        case Refused():
            assert NAMESPACE_PATTERN.match(answer.namespace)
            assert answer.code in ("invalid_request", "unexpected_event")
            assert answer.reason and "\n" not in answer.reason
            _, commands = CORE.reject(answer.namespace, answer.request_id, answer.kind,
                                      answer.code, answer.reason, AT)
            emitted = [c.envelope for c in commands if isinstance(c, Emit)]
            assert emitted[-1].event_type == "workflow.failed"
            for envelope in emitted:  # the failure event survives its own trip through Kafka
                assert decode(envelope.to_bytes()) == envelope
        case Admitted(request=request):
            assert request.event_type in REQUEST_TYPES
            _, commands = CORE.start(request, AT)
            for c in commands:
                if isinstance(c, Emit):
                    assert decode(c.envelope.to_bytes()) == c.envelope
        case _:
            raise AssertionError(f"admit returned {answer!r}")
    return type(answer).__name__


@fuzz(4000)
@given(RECORDS)
def test_any_record_gets_one_clear_answer(raw: bytes) -> None:
    check_one_clear_answer(raw)


@fuzz(4000)
@given(mutated_requests())
def test_mutated_requests_get_one_clear_answer(raw: bytes) -> None:
    check_one_clear_answer(raw)


@fuzz(2000)
@given(st.binary(max_size=64) | JSON.map(lambda v: repr(v).encode()))
def test_junk_is_unreadable_or_refused(raw: bytes) -> None:
    assert check_one_clear_answer(raw) in ("Unreadable", "Refused")


VALID = (b'{"event_id": "9b2c7a1e-7c1f-4f54-9b7e-2f1f6f4b7a10", "event_type": "stamp.requested",'
         b' "namespace": "ns", "correlation_id": "9b2c7a1e-7c1f-4f54-9b7e-2f1f6f4b7a10",'
         b' "occurred_at": "2026-11-23T10:00:00Z", "source": "t",'
         b' "payload": {"type": "stamp.requested", "content": "aGk="}}')


def test_the_three_answers_are_each_reachable() -> None:
    """Guards the fuzz itself: its strategies do reach every answer."""
    seen = {check_one_clear_answer(raw) for raw in (
        b"\xff",
        b'{"namespace": "ns", "event_id": "9b2c7a1e-7c1f-4f54-9b7e-2f1f6f4b7a10"}',
        VALID,
    )}
    assert seen == {"Unreadable", "Refused", "Admitted"}


def test_a_newline_in_a_field_name_does_not_split_the_reason() -> None:
    """Found by the fuzz: a sender-chosen key went into the one-line reason as it was."""
    answer = admit(VALID.replace(b'"source"', b'"evil\\nkey": 1, "source"'))
    assert isinstance(answer, Refused)
    assert "\n" not in answer.reason and "evil\\nkey" in answer.reason


@pytest.mark.parametrize("brk", ["\\u0085", "\\u2028", "\\u001c", "\\u000b", "\\r"])
def test_no_line_break_of_any_kind_splits_the_reason(brk: str) -> None:
    """Found by the end-to-end fuzz: U+0085 (next line) is a line break to Unicode and to
    ``str.splitlines``, and went into the reason as it was."""
    key = f'"evil{brk}key"'.encode()
    answer = admit(VALID.replace(b'"source"', key + b': 1, "source"'))
    assert isinstance(answer, Refused)
    assert len(answer.reason.splitlines()) == 1, answer.reason


@pytest.mark.parametrize(("field", "value", "where"), [
    ("prompt", "x" * (MAX_PROMPT_CHARS + 1), "payload.generation.requested.prompt"),
    ("negative_prompt", "x" * (MAX_PROMPT_CHARS + 1),
     "payload.generation.requested.negative_prompt"),
    ("width", 4096 + 16, "payload.generation.requested.width"),
    ("num_inference_steps", 101, "payload.generation.requested.num_inference_steps"),
])
def test_size_limits_on_generation_requests_refuse_clearly(field: str, value: object,
                                                          where: str) -> None:
    doc = json.loads(VALID)
    doc["event_type"] = "generation.requested"
    doc["payload"] = {"type": "generation.requested", "prompt": "a cat", field: value}
    answer = admit(json.dumps(doc).encode())
    assert isinstance(answer, Refused) and answer.code == "invalid_request"
    assert answer.reason.startswith(f"{where}: ") and len(answer.reason) < 300


@pytest.mark.parametrize(("variable", "value"), [
    ("STAMPFLOW_REDUCER_BATCH_MAX", "100001"), ("STAMPFLOW_MAX_IN_FLIGHT", "100001"),
    ("STAMPFLOW_REDUCER_BATCH_MAX", "0"),
])
def test_batch_and_in_flight_settings_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                                  variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings()
