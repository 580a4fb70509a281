"""Benchmarks, reports rather than tests: `engine` (our engine against the reference
implementation, `wwt bench`) and `queue_path` (what Redis and a Celery worker add to one
request, and what a suggestion-cache hit costs)."""
