"""Training: the loop, the sharded step, stacks of runs, optimizer, checkpoints, the
workdir contract, metrics, config checks and fine-tuning from pretrained weights.

`train.train_and_evaluate(config, workdir)` trains (and resumes); `train.evaluate_checkpoint`
evaluates a workdir's checkpoint; `train.build` + `train.read_checkpoint` load one.

May import: models, data, weights, `resnet_jax.sharding`, `resnet_jax.errors`. Nothing
imports training but the commands and the public API.
"""
