"""Train or evaluate a ResNet from a config file: `python main.py` and `resnet-jax-train`.

    python main.py --config=configs/resnet50_imagenet.py --workdir=DIR
    python main.py --config=configs/cifar10.py:resnet110 --workdir=DIR --config.batch_size=256
    python main.py --config=... --workdir=DIR --mode=eval [--checkpoint_step=N]

Rerunning the same command resumes from the latest checkpoint. Started as several
processes (a multi-host TPU slice, a GPU cluster), each process runs this same command;
see docs/distributed.md.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.commands import usage
from resnet_jax.errors import EXIT_PREEMPTED, CheckpointWriteError, Preempted, UserError
from resnet_jax.training.metrics import console_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config',
  None,
  'config file, configs/*.py[:ARG]; --config.FIELD=VALUE overrides one of its fields',
  lock_config=True,
)
flags.DEFINE_string('workdir', None, 'directory for checkpoints, metrics and logs')
flags.DEFINE_enum(
  'mode', 'train', ['train', 'eval'], 'train (resuming), or only evaluate a checkpoint'
)
flags.DEFINE_integer(
  'checkpoint_step', None, 'with --mode=eval: the step to evaluate (default: the latest)'
)
flags.DEFINE_list(
  'allow_config_change',
  [],
  'config fields that may differ from WORKDIR/config.json on a restart, e.g. num_train_steps',
)
flags.DEFINE_enum(
  'distributed',
  'auto',
  ['auto', 'on', 'off'],
  'jax.distributed.initialize; auto: in a cluster job or given --coordinator_address',
)
flags.DEFINE_string('coordinator_address', None, 'multi-process: host:port of process 0')
flags.DEFINE_integer('num_processes', None, 'multi-process: the number of processes')
flags.DEFINE_integer('process_id', None, 'multi-process: the index of this process')

_USAGE = (
  'resnet-jax-train --config=FILE[:ARG] --workdir=DIR [flags]\n'
  '   or: python main.py --config=FILE[:ARG] --workdir=DIR [flags]'
)
_ABOUT = """\
Train a ResNet from a config file, or evaluate a checkpoint of the workdir (--mode=eval:
prints the metrics and appends them to WORKDIR/metrics.jsonl). Rerunning the same command
resumes from the latest checkpoint. configs/default.py lists every field of a config."""
_EXAMPLE = 'resnet-jax-train --config=configs/smoke.py --workdir=/tmp/smoke  # 20 steps, seconds'

# Environment variables that mean "one of several processes of a cluster job".
_CLUSTER_ENV = (
  'SLURM_NTASKS',
  'OMPI_COMM_WORLD_SIZE',
  'TPU_WORKER_HOSTNAMES',
  'MEGASCALE_COORDINATOR_ADDRESS',
)


def _wants_distributed() -> bool:
  if FLAGS.distributed != 'auto':
    return FLAGS.distributed == 'on'
  if FLAGS.coordinator_address:
    return True
  return any(
    int(os.environ.get(k, '1')) > 1
    if k.endswith(('NTASKS', 'SIZE'))
    else ',' in os.environ.get(k, '')
    for k in _CLUSTER_ENV
  )


def _init_jax() -> None:
  import jax

  if _wants_distributed():
    # CPU processes talk through gloo (the default CPU collectives do not cross processes).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  cache = FLAGS.config.compilation_cache_dir
  if cache:
    # Restarting the same config then loads the compiled step instead of compiling again.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(_) -> None:
  console_logging()
  _init_jax()
  from resnet_jax.training import train  # after jax.distributed: it must come before any jax use

  if FLAGS.mode == 'eval':
    per_member = train.evaluate_checkpoint(
      FLAGS.config,
      FLAGS.workdir,
      FLAGS.checkpoint_step,
      allow_config_change=FLAGS.allow_config_change,
    )
    for metrics in per_member:
      print(' '.join(f'{k}={_number(v)}' for k, v in metrics.items()))
  else:
    if FLAGS.checkpoint_step is not None:
      raise UserError('--checkpoint_step is for --mode=eval; training resumes from the latest.')
    train.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )


def _number(v: float | str) -> str:
  """A metric as printed: integers without a point, floats to 6 digits, names as they are."""
  if isinstance(v, str):
    return v
  return str(int(v)) if float(v).is_integer() else f'{v:.6g}'


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported in one line."""
  try:
    rest = FLAGS(argv)
    if FLAGS.config is None:
      _fail('--config is required: give a config file, e.g. --config=configs/smoke.py.')
    if not FLAGS.workdir:
      _fail('--workdir is required: a directory for checkpoints and metrics, e.g. --workdir=DIR.')
    FLAGS.config.model  # noqa: B018 - a config file that failed to load raises here
    return rest
  except flags.Error as e:
    _fail(f'{e}; see `resnet-jax-train --help`.')
  except SyntaxError as e:
    _fail(f'{e.filename}:{e.lineno}: {e.msg}; fix the config file.')
  except OSError as e:
    given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')][-1]
    path = given.split(':')[0]
    cause = 'no such file' if not os.path.isfile(path) else ' '.join(str(e.__cause__ or e).split())
    _fail(f'cannot load --config={given} ({cause}); give a file such as configs/smoke.py.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections rejects a misspelt --config.FIELD with "Did you mean ...", in a
    # repr with escaped quotes and newlines.
    detail = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    _fail(f'bad --config override ({detail}); configs/default.py lists every field.')


def main() -> None:
  usage.answer_help_or_version(sys.argv, usage.help_text(_USAGE, _ABOUT, __name__, _EXAMPLE))
  try:
    app.run(run, flags_parser=_parse_flags)
  except Preempted:
    # Saved and logged; a non-zero code so that a scheduler (or run_suite.py) reruns it.
    sys.exit(EXIT_PREEMPTED)
  except CheckpointWriteError as e:
    # The failed save's orbax threads never finish and would hold the exit forever.
    print(f'error: {e}', file=sys.stderr, flush=True)
    os._exit(2)
  except UserError as e:
    _fail(str(e))


if __name__ == '__main__':
  main()
