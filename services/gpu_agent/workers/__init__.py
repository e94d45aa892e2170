"""Engines in their own processes: a worker process per engine, pre-started
and device-initialized spares per device (warm start), and the agent-side
proxy that makes a worker look like an in-process engine."""
