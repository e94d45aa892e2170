"""`prism simulate`: a discrete-event simulation of a Prism cluster driven by
a trace, running the real placement, memory and admission policy code and
the engines' real batching scheduler, with step and activation times from a
latency profile fitted to measured benchmarks (profile.py)."""
