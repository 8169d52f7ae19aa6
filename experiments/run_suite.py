"""Run a named ablation suite: one `python main.py ...` subprocess per run and seed.

    python experiments/run_suite.py --suite=cifar10_degradation --workdir=DIR \\
        [--depths=20,56] [--seeds=3] [--steps_scale=0.1] [--set FIELD=VALUE ...] [--stack]
        [--parallel=2] [--dry_run]

Each run trains in DIR/<run>/seed<k> (with --config.seed=k); with --stack, the runs that
can share a program train as one stacked run in DIR/stacks/<runs> and DIR/<run>/seed<k>
links to its member's directory. Each program leaves in its directory its command
line (command.txt), its console log (log.txt) and, after a successful exit, DONE (a JSON
with the command, the time taken and the date). A rerun skips DONE runs and resumes the
others from their checkpoints; a failing run leaves FAILED (exit code and the end of its
log) and the suite goes on. DIR/suite.json describes the runs for experiments/report.py.

With --parallel=N, N programs train at once, each pinned to its own 1/N of the CPUs this
process may use (and as many OpenMP threads): on a CPU, N narrow runs side by side beat
N runs one after another on every core, as a step's small kernels scale poorly over cores.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

from experiments import suites  # noqa: E402
from resnet_jax.errors import EXIT_PREEMPTED, UserError  # noqa: E402

COMMAND_FILE, LOG_FILE, DONE_FILE, FAILED_FILE = 'command.txt', 'log.txt', 'DONE', 'FAILED'
MANIFEST_FILE = 'suite.json'
TAIL_LINES = 30

# The CPUs a program is pinned to; None: not pinned (every CPU of this process).
Cpus = frozenset[int] | None
# (command, log file, CPUs) -> exit code; tests put a fake one in place of the subprocess.
Runner = Callable[[Sequence[str], str, Cpus], int]


def subprocess_runner(command: Sequence[str], log_path: str, cpus: Cpus = None) -> int:
  """Runs `command` from the repository root, stdout and stderr appended to `log_path`;
  given `cpus`, pins it there with as many OpenMP threads (any inherited value replaced).

  The pin is the calling thread's own (Linux: sched_setaffinity of pid 0 sets the calling
  thread's mask), which the child inherits, and by which XLA sizes its thread pool; so
  call it with `cpus` from a thread of its own (run_jobs has one per CPU group).
  """
  env = None
  if cpus is not None:
    os.sched_setaffinity(0, cpus)
    env = {**os.environ, 'OMP_NUM_THREADS': str(len(cpus))}
  with open(log_path, 'a') as log:
    return subprocess.run(
      command, cwd=suites.REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
    ).returncode


def cpu_groups(parallel: int) -> list[Cpus]:
  """This process's CPUs in `parallel` equal groups (the remainder unused); [None] for 1."""
  if parallel == 1:
    return [None]
  cpus = sorted(os.sched_getaffinity(0))
  if not 1 <= parallel <= len(cpus):
    raise UserError(
      f'--parallel={parallel}: this process may use {len(cpus)} CPUs; give 1 to {len(cpus)}.'
    )
  size = len(cpus) // parallel
  return [frozenset(cpus[i * size : (i + 1) * size]) for i in range(parallel)]


def write_manifest(
  workdir: str,
  name: str,
  suite: suites.Suite,
  runs: Sequence[suites.Run],
  seeds: int,
  steps_scale: float,
) -> None:
  """WORKDIR/suite.json: the suite and its runs, merged with runs an earlier call made."""
  path = os.path.join(workdir, MANIFEST_FILE)
  earlier = read_json(path).get('runs', []) if os.path.exists(path) else []
  by_name = {r['name']: r for r in earlier} | {r.name: dataclasses.asdict(r) for r in runs}
  order = [r.name for r in suite.runs]  # the suite's order, whatever order runs were made in
  manifest = {
    'suite': name,
    'description': suite.description,
    'paper_metric': suite.paper_metric,
    'seeds': seeds,
    'steps_scale': steps_scale,
    'runs': sorted(by_name.values(), key=lambda r: _index(order, r['name'])),
  }
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(manifest, f, indent=1)


def _index(order: list[str], name: str) -> int:
  return order.index(name) if name in order else len(order)


def read_json(path: str) -> dict:
  """The JSON object in the file at `path`."""
  with open(path) as f:
    return json.load(f)


def link_members(job: suites.Job, workdir: str) -> None:
  """WORKDIR/<run>/seed<k> -> the stack member's directory, for each member of `job`.

  A seed directory left by an unstacked run is not replaced: that is a UserError.
  """
  for run_dir, member_dir in job.members:
    link = os.path.join(workdir, run_dir)
    target = os.path.relpath(os.path.join(workdir, member_dir), os.path.dirname(link))
    if os.path.islink(link) and os.readlink(link) == target:
      continue
    if os.path.lexists(link):
      raise UserError(
        f'{link} exists and is not the link to its stack member; it holds an unstacked '
        'run: use another --workdir, or run this suite without --stack.'
      )
    os.makedirs(os.path.join(workdir, member_dir), exist_ok=True)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


def run_job(
  job: suites.Job, workdir: str, runner: Runner = subprocess_runner, cpus: Cpus = None
) -> str:
  """Trains one job unless DONE; returns 'ok', 'failed', 'skipped' or 'preempted' (main.py
  stopped it early on a SIGTERM, its state saved: no DONE, and a rerun resumes it).

  A stacked job's DONE is also written in each member's directory (with the time of the
  whole program), so report.py finds every run finished.
  """
  run_dir = os.path.join(workdir, job.directory)
  if os.path.exists(os.path.join(run_dir, DONE_FILE)):
    return 'skipped'
  link_members(job, workdir)
  os.makedirs(run_dir, exist_ok=True)
  line = shlex.join(job.command)
  _write(os.path.join(run_dir, COMMAND_FILE), line + '\n')
  log_path = os.path.join(run_dir, LOG_FILE)
  start = time.time()
  code = runner(job.command, log_path, cpus)
  seconds = round(time.time() - start, 1)
  if code == EXIT_PREEMPTED:  # saved, not finished: a rerun resumes it
    return 'preempted'
  if code != 0:
    _write(os.path.join(run_dir, FAILED_FILE), f'exit code {code}\n{_tail(log_path)}')
    return 'failed'
  if os.path.exists(os.path.join(run_dir, FAILED_FILE)):
    os.remove(os.path.join(run_dir, FAILED_FILE))  # an earlier attempt's, now superseded
  done = {
    'command': line,
    'seconds': seconds,
    'finished': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
  }
  if job.members:
    done['stack'] = {'directory': job.directory, 'members': len(job.members)}
  for directory in [job.directory, *(member for _, member in job.members)]:
    _write(os.path.join(workdir, directory, DONE_FILE), json.dumps(done, indent=1) + '\n')
  return 'ok'


def run_jobs(
  jobs: Sequence[suites.Job],
  workdir: str,
  runner: Runner = subprocess_runner,
  groups: Sequence[Cpus] = (None,),
) -> dict[str, list[str]]:
  """Every job, one at a time per CPU group of `groups` (`cpu_groups`), a failure not
  stopping the rest, a preemption stopping them all (the jobs running go on to their own
  SIGTERM): {'ok'|'failed'|'skipped'|'preempted': [dirs]}, each list in order of ending."""
  results: dict[str, list[str]] = {'ok': [], 'failed': [], 'skipped': [], 'preempted': []}
  todo = iter(enumerate(jobs, 1))
  lock = threading.Lock()  # guards todo, results and the console

  def work(cpus: Cpus) -> None:  # one per CPU group: takes the next job until none is left
    while True:
      with lock:
        i, job = next(todo, (0, None))
        if job is None or results['preempted']:
          return  # the machine is going away; rerunning the suite resumes here
        print(f'[{i}/{len(jobs)}] {job.directory} ...', flush=True)
      start = time.time()
      status = run_job(job, workdir, runner, cpus)
      with lock:
        results[status].append(job.directory)
        print(
          f'[{i}/{len(jobs)}] {job.directory}: {status} ({time.time() - start:.0f} s)', flush=True
        )
        if status == 'failed':
          with open(os.path.join(workdir, job.directory, FAILED_FILE)) as f:
            print(f.read(), file=sys.stderr, flush=True)

  workers = [threading.Thread(target=work, args=(cpus,)) for cpus in groups]
  for worker in workers:
    worker.start()
  for worker in workers:
    worker.join()
  return results


def _tail(path: str, lines: int = TAIL_LINES) -> str:
  if not os.path.exists(path):
    return ''
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def _write(path: str, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)


def summary(results: dict[str, list[str]]) -> str:
  """One line of counts, then the failed runs."""
  counts = ', '.join(f'{len(v)} {k}' for k, v in results.items())
  return '\n'.join([f'summary: {counts}', *(f'  FAILED {d}' for d in results['failed'])])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--suite', required=True, choices=list(suites.SUITES))
  parser.add_argument('--workdir', required=True, help='Suite directory: one subdirectory per run.')
  parser.add_argument(
    '--depths',
    type=lambda s: [int(d) for d in s.split(',')],
    default=[],
    help='Only the runs of these depths, e.g. 20,56.',
  )
  parser.add_argument('--seeds', type=int, default=1, help='Seeds 0..N-1 of every run.')
  parser.add_argument(
    '--steps_scale',
    type=float,
    default=1.0,
    help='Multiplies training steps, lr boundaries, warmup and the log, eval '
    'and checkpoint intervals (fields given with --set are kept as given).',
  )
  parser.add_argument(
    '--set',
    nargs='+',
    action='extend',
    default=[],
    metavar='FIELD=VALUE',
    help='Config overrides for every run (main.py --config.FIELD=VALUE).',
  )
  parser.add_argument(
    '--stack',
    action='store_true',
    help='Train the runs that can share a program (seeds; plain/residual twins with '
    'option-A shortcuts) as one stacked run each (resnet_jax.training.stack).',
  )
  parser.add_argument(
    '--parallel',
    type=int,
    default=1,
    help='Train N programs at once, each pinned to 1/N of the CPUs (CPU machines; '
    'on 2 cores two single-core ResNet-56 runs train 1.26x faster than one after another).',
  )
  parser.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  suite = suites.SUITES[args.suite]
  workdir = os.path.abspath(args.workdir)
  try:
    groups = cpu_groups(args.parallel)  # a bad --parallel fails before any run
    runs = suites.select_runs(suite, args.depths)
    expand = suites.expand_stacked if args.stack else suites.expand
    jobs = expand(runs, workdir, args.seeds, args.steps_scale, suites.parse_sets(args.set))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if args.dry_run:
    print('\n'.join(shlex.join(job.command) for job in jobs))
    return
  try:
    for job in jobs:
      link_members(job, workdir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  write_manifest(workdir, args.suite, suite, runs, args.seeds, args.steps_scale)
  results = run_jobs(jobs, workdir, groups=groups)
  print(summary(results))
  sys.exit(EXIT_PREEMPTED if results['preempted'] else 1 if results['failed'] else 0)


if __name__ == '__main__':
  main()
