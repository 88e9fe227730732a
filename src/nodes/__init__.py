"""stampflow nodes: the orchestrator, the reducer and the compute and effect nodes."""
