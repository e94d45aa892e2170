"""Fault injection for the worker processes a test starts with this folder on
PYTHONPATH (Python imports `sitecustomize` at start-up, before the worker's
own code). Nothing here runs in any other process.

PRISM_TEST_FAIL_ALL_REDUCE="RANK:N": the Nth all-reduce (counted from 1) of
tensor-parallel rank RANK raises, in the middle of a forward, as a failing
device or collective would; its peers are then left inside that forward."""

import os

_spec = os.environ.get("PRISM_TEST_FAIL_ALL_REDUCE")
if _spec:
    from services.gpu_agent.engine import tensor_parallel

    _rank, _nth = (int(x) for x in _spec.split(":"))
    _real = tensor_parallel.TensorParallel.all_reduce
    _calls = [0]

    def _all_reduce_failing_once(self, x):
        if self.rank == _rank:
            _calls[0] += 1
            if _calls[0] == _nth:
                raise RuntimeError(f"injected failure of all-reduce {_nth} on rank {_rank}")
        return _real(self, x)

    tensor_parallel.TensorParallel.all_reduce = _all_reduce_failing_once
