"""stampflow: event-driven BLAKE3 stamping and image generation over Kafka and PostgreSQL.

This package holds the wiring: settings, the embedded and external services, the Kafka and
PostgreSQL runners and the ``stampflow`` command line. The domain lives in ``contracts``
(events and node contracts), ``nodes`` (pure cores) and ``inference`` (diffusers).
"""

__version__ = "0.1.0"
