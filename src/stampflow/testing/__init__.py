"""Testing stampflow and what is built on it, against real services (in FastStream's spirit:
the same code paths as production, no broker mocks).

- :mod:`stampflow.testing.pytest_plugin`: typed pytest fixtures for running services (embedded,
  external or in containers), a fresh database and unique topics per test, and services
  behind fault proxies;
- :mod:`stampflow.testing.stack`: node processes (``stampflow run``) and in-process stacks,
  settings for a test, and the reads that check results (finished workflows, aggregates,
  ``stampflow check``, a topic's records);
- :mod:`stampflow.testing.faultproxy`: a TCP proxy that refuses, hangs, slows, resets or flaps
  every connection to a service, for outage tests without root;
- :mod:`stampflow.testing.containers`: PostgreSQL and a Kafka-API broker through testcontainers.

pytest and testcontainers come with the ``dev`` extra; nothing here is imported by the nodes.
"""
