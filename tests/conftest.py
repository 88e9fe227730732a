"""The suite's fixtures come from stampflow's pytest plugin (stampflow/testing/pytest_plugin.py):
``services``, ``topic_prefix``, ``fresh_database_url``, ``proxied_services``."""

from __future__ import annotations

# Imported (and so compiled by pytest's assertion rewriter) now, before any test starts a
# thread: hypothesis's pytest plugin otherwise imports it lazily at the end of a session that
# used none of it, and CPython 3.11.7 has been seen to fail that compile with a spurious
# "SystemError: AST constructor recursion depth mismatch" (an INTERNALERROR for pytest).
import hypothesis  # noqa: F401

pytest_plugins = ["stampflow.testing.pytest_plugin"]
