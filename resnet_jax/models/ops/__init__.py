"""Kernels behind the model's implementation switches: each computes what a flax/XLA op
computes (the same function, tested against it) in a way that is faster somewhere.

`conv_lowering` (each convolution direction lowered per shape, for CPUs), `onednn` (oneDNN's
CPU convolutions as XLA FFI calls, through ctypes), `max_pool` (index
VJP), `channel_stats` (BN statistics), `fused_conv` (1x1 convolution
with a BN prologue and statistics epilogue) and `pallas_triton` (their shared Pallas
settings).

May import: jax, `resnet_jax.errors`. Nothing else of the package.
"""
