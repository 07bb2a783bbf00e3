"""Benchmarks of kfac-tune (run as scripts: ``PYTHONPATH=. python benchmarks/<name>.py``)."""
