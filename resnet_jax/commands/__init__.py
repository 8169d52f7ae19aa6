"""The console commands, each a thin absl front over the library:
`main` (train and evaluate; `python main.py`, `resnet-jax-train`) and `convert`
(pretrained weights into and out of a workdir; `resnet-jax-convert`). The model summary
command lives with the models (`resnet_jax.models.summary`, `resnet-jax-summary`).

May import anything in the package; nothing in the package imports commands.
"""

from resnet_jax import host_memory

# Before the commands' imports start any thread (numpy's BLAS starts one): see host_memory.
host_memory.reuse_freed_memory()
