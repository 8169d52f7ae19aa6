"""Throughput and precision harnesses; run as modules from the repo root (`python -m ...`)."""

from resnet_jax import host_memory

# As the training command does, before any import starts a thread: see host_memory.
host_memory.reuse_freed_memory()
