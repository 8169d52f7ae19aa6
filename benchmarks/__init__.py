"""Throughput and precision harnesses; run as modules from the repo root (`python -m ...`)."""
