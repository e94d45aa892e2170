"""Workloads: traces of timed requests for models, generated (bursty groups)
or loaded from public trace files, saved and replayed as JSON lines."""
