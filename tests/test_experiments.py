"""The ablation suites: declarations, their expansion, the driver and the report."""

import json
import os
import shlex
import subprocess
import sys
import threading

import pytest

from experiments import report, run_suite, suites
from resnet_jax.errors import EXIT_PREEMPTED, UserError
from resnet_jax.training.metrics import read_metrics
from tests.process_env import xla_flags

SMOKE = 'configs/smoke.py'


def _flags(command: tuple[str, ...]) -> dict[str, str]:
  """{'config.FIELD': VALUE} of a main.py command line."""
  return dict(arg[2:].split('=', 1) for arg in command if arg.startswith('--config.'))


def _toy_run(
  name: str,
  label: str = 'toy',
  depth: int = 20,
  residual: bool = True,
  panel: str = 'ResNets',
  paper_error: float | None = None,
) -> suites.Run:
  return suites.Run(name, SMOKE, label, depth, residual, panel, {}, paper_error)


def test_cifar10_degradation_declares_plain_and_residual_twins():
  runs = {r.name: r for r in suites.SUITES['cifar10_degradation'].runs}
  assert list(runs) == [
    f'cifar_{kind}{d}' for kind in ('plain', 'resnet') for d in (20, 32, 44, 56, 110)
  ]
  r56, p56 = runs['cifar_resnet56'], runs['cifar_plain56']
  assert (r56.config, r56.label, r56.depth, r56.residual, r56.panel, r56.paper_error) == (
    'configs/cifar10.py:resnet56',
    'ResNet-56',
    56,
    True,
    'ResNets',
    6.97,
  )
  assert (p56.config, p56.label, p56.residual, p56.panel, p56.paper_error) == (
    'configs/cifar10.py:plain56',
    'plain-56',
    False,
    'plain nets',
    None,
  )
  assert [runs[f'cifar_resnet{d}'].paper_error for d in (20, 32, 44, 110)] == [
    8.75,
    7.51,
    7.17,
    6.43,
  ]
  assert all(not r.overrides for r in runs.values())


def test_imagenet_suites_use_the_papers_shortcut_options():
  depth = {
    r.name: (r.config, dict(r.overrides), r.panel, r.paper_error)
    for r in suites.SUITES['imagenet_depth'].runs
  }
  assert depth == {  # Table 2: the ResNets have option A, no more parameters than plain nets
    'imagenet_plain18': ('configs/plain18_imagenet.py', {}, 'plain nets', 27.94),
    'imagenet_plain34': ('configs/plain34_imagenet.py', {}, 'plain nets', 28.54),
    'imagenet_resnet18_A': (
      'configs/resnet18_imagenet.py',
      {'model_overrides.shortcut': 'A'},
      'ResNets',
      27.88,
    ),
    'imagenet_resnet34_A': (
      'configs/resnet34_imagenet.py',
      {'model_overrides.shortcut': 'A'},
      'ResNets',
      25.03,
    ),
  }
  options = {
    r.name: (dict(r.overrides), r.label, r.paper_error)
    for r in suites.SUITES['shortcut_options'].runs
  }
  assert options == {
    f'imagenet_resnet34_{s}': ({'model_overrides.shortcut': s}, f'ResNet-34 {s}', e)
    for s, e in zip('ABC', (25.03, 24.52, 24.19), strict=True)
  }
  cifar = suites.SUITES['cifar_shortcut_options'].runs
  assert [(r.name, r.panel) for r in cifar] == [
    (f'cifar_resnet{d}_{s}', f'ResNet-{d}') for d in (20, 56) for s in 'ABC'
  ]


def test_mnist_depth_uses_the_design_notes_config_with_plain_twins():
  runs = {r.name: (r.config, dict(r.overrides)) for r in suites.SUITES['mnist_depth'].runs}
  no_zero_init = {'model_overrides.zero_init_last_bn': False}
  assert runs == {
    'mnist_plain18': ('configs/mnist_resnet34.py', {'model': 'plain18', **no_zero_init}),
    'mnist_plain34': ('configs/mnist_resnet34.py', {'model': 'plain34', **no_zero_init}),
    'mnist_resnet18': ('configs/mnist_resnet34.py', {'model': 'resnet18'}),
    'mnist_resnet34': ('configs/mnist_resnet34.py', {}),
  }


def test_expand_gives_one_job_per_run_and_seed(tmp_path):
  runs = suites.select_runs(suites.SUITES['cifar10_degradation'], [20, 56])
  jobs = suites.expand(runs, str(tmp_path), seeds=2)
  assert [j.directory for j in jobs] == [
    f'cifar_{kind}{d}/seed{k}' for kind in ('plain', 'resnet') for d in (20, 56) for k in (0, 1)
  ]
  assert jobs[-1].command == (
    sys.executable,
    'main.py',
    '--config=configs/cifar10.py:resnet56',
    f'--workdir={tmp_path}/cifar_resnet56/seed1',
    '--config.seed=1',
  )
  with pytest.raises(UserError, match='its depths'):
    suites.select_runs(suites.SUITES['cifar10_degradation'], [8])


def test_steps_scale_shrinks_every_step_count_and_keeps_set_fields(tmp_path):
  runs = suites.select_runs(suites.SUITES['cifar10_degradation'], [110])
  jobs = suites.expand(
    runs, str(tmp_path), steps_scale=0.1, sets={'eval_every_steps': '50', 'data_dir': '/data'}
  )
  plain, resnet = (_flags(j.command) for j in jobs)
  assert resnet == {
    'config.seed': '0',
    'config.num_train_steps': '6400',
    'config.warmup_steps': '40',
    'config.checkpoint_every_steps': '200',
    'config.log_every_steps': '10',
    'config.lr_boundaries': '(3200,4800)',  # 50% and 75%, as 32k and 48k of 64k
    'config.eval_every_steps': '50',
    'config.data_dir': '/data',
  }  # --set: as given
  assert plain['config.warmup_steps'] == '0'


def test_steps_scale_converts_epochs_to_steps():
  config = suites.load_config(
    'configs/cifar10.py:resnet20',
    {
      'num_train_steps': -1,
      'num_epochs': 30.0,
      'lr_boundaries': (),
      'lr_boundaries_epochs': (10, 20),
      'eval_every_steps': -1,
    },
  )
  assert suites.scale_steps(config, 0.1) == {  # 390 steps per epoch at batch 128
    'num_train_steps': 1170,
    'lr_boundaries': (390, 780),
    'lr_boundaries_epochs': (),
    'warmup_steps': 0,
    'eval_every_steps': 39,
    'checkpoint_every_steps': 200,
    'log_every_steps': 10,
  }
  scaled = suites.load_config('configs/cifar10.py:resnet20', suites.scale_steps(config, 0.1))
  assert (scaled.num_train_steps, scaled.lr_boundaries) == (1170, (390, 780))


def test_every_suite_expands_against_its_config_files(tmp_path):
  for suite in suites.SUITES.values():  # loading each config checks each override
    assert len(suites.expand(suite.runs, str(tmp_path), steps_scale=0.01)) == len(suite.runs)
  imagenet = suites.load_config('configs/resnet34_imagenet.py', {})
  assert suites.scale_steps(imagenet, 0.01) == {  # 100 epochs of 1251 steps, cosine
    'num_train_steps': 1251,
    'warmup_steps': 63,  # 5 epochs
    'eval_every_steps': 13,  # once per (unscaled) epoch
    'checkpoint_every_steps': 10,
    'log_every_steps': 1,
  }


def test_bad_overrides_fail_before_any_run(tmp_path):
  runs = suites.select_runs(suites.SUITES['cifar10_degradation'], [20])
  with pytest.raises(UserError, match='no config field bogus'):
    suites.expand(runs, str(tmp_path), sets={'bogus': '1'})
  with pytest.raises(UserError, match='FIELD=VALUE'):
    suites.parse_sets(['batch_size'])
  assert suites.parse_sets(['config.a=1', 'b=x=y']) == {'a': '1', 'b': 'x=y'}


def test_cli_dry_run_and_error_exit():
  cmd = [
    sys.executable,
    'experiments/run_suite.py',
    '--suite=cifar10_degradation',
    '--workdir=/tmp/unused',
    '--depths=56',
    '--dry_run',
  ]
  ok = subprocess.run(cmd, capture_output=True, text=True, cwd=suites.REPO, check=True)
  assert [shlex.split(line)[2] for line in ok.stdout.splitlines()] == [
    '--config=configs/cifar10.py:plain56',
    '--config=configs/cifar10.py:resnet56',
  ]
  bad = subprocess.run(
    [*cmd, '--set', 'bogus=1'], capture_output=True, text=True, cwd=suites.REPO, check=False
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('error: ')
  too_many = subprocess.run(
    [*cmd, '--parallel=100000'], capture_output=True, text=True, cwd=suites.REPO, check=False
  )
  assert too_many.returncode == 2
  assert too_many.stderr.strip().startswith('error: --parallel=100000: this process may use')


def test_driver_skips_done_runs_and_survives_failures(tmp_path):
  workdir = str(tmp_path)
  jobs = suites.expand([_toy_run('a'), _toy_run('b'), _toy_run('c')], workdir)
  os.makedirs(tmp_path / 'a' / 'seed0')
  (tmp_path / 'a' / 'seed0' / 'DONE').write_text('{}')
  calls = []

  def fake_runner(command, log_path, cpus, fail=True):
    calls.append(command)
    with open(log_path, 'a') as f:
      f.write('compiling\nerror: boom\n')
    return 3 if fail and '/b/' in command[3] else 0

  results = run_suite.run_jobs(jobs, workdir, fake_runner)
  assert results == {
    'ok': ['c/seed0'],
    'failed': ['b/seed0'],
    'skipped': ['a/seed0'],
    'preempted': [],
  }
  assert [c[3] for c in calls] == [f'--workdir={workdir}/b/seed0', f'--workdir={workdir}/c/seed0']
  failed = (tmp_path / 'b' / 'seed0' / 'FAILED').read_text()
  assert failed.startswith('exit code 3\n') and 'error: boom' in failed
  done = json.loads((tmp_path / 'c' / 'seed0' / 'DONE').read_text())
  assert done['command'] == shlex.join(jobs[2].command) and done['seconds'] >= 0
  command = (tmp_path / 'b' / 'seed0' / 'command.txt').read_text()
  assert command == shlex.join(jobs[1].command) + '\n'
  assert run_suite.summary(results) == (
    'summary: 1 ok, 1 failed, 1 skipped, 0 preempted\n  FAILED b/seed0'
  )

  # The rerun only retries the failed run; its success clears FAILED.
  results = run_suite.run_jobs(
    jobs, workdir, lambda c, p, cpus: fake_runner(c, p, cpus, fail=False)
  )
  assert results == {
    'ok': ['b/seed0'],
    'failed': [],
    'skipped': ['a/seed0', 'c/seed0'],
    'preempted': [],
  }
  assert not (tmp_path / 'b' / 'seed0' / 'FAILED').exists()


def test_cpu_groups_split_the_affinity_mask_evenly(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 5})
  assert run_suite.cpu_groups(1) == [None]
  assert run_suite.cpu_groups(2) == [frozenset({0, 1}), frozenset({2, 3})]
  assert run_suite.cpu_groups(5) == [frozenset({c}) for c in (0, 1, 2, 3, 5)]
  for bad in (0, 6):
    with pytest.raises(UserError, match='give 1 to 5'):
      run_suite.cpu_groups(bad)


def test_parallel_jobs_run_at_once_on_disjoint_cpus(tmp_path, monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})
  workdir = str(tmp_path)
  jobs = suites.expand([_toy_run(name) for name in 'abcd'], workdir)
  both_running = threading.Barrier(2, timeout=10)  # broken unless two jobs overlap
  cpus_of = {}

  def overlapping_runner(command, log_path, cpus):
    name = command[3].split('/')[-2]
    cpus_of[name] = cpus
    if name in 'ab':
      both_running.wait()
    return 0

  results = run_suite.run_jobs(jobs, workdir, overlapping_runner, run_suite.cpu_groups(2))
  assert sorted(results['ok']) == ['a/seed0', 'b/seed0', 'c/seed0', 'd/seed0']
  assert {cpus_of['a'], cpus_of['b']} == {frozenset({0, 1}), frozenset({2, 3})}
  assert all((tmp_path / name / 'seed0' / 'DONE').exists() for name in 'abcd')


def test_subprocess_runner_pins_the_program_and_its_openmp_threads(tmp_path):
  mask = os.sched_getaffinity(0)
  cpu = min(mask)
  log = tmp_path / 'log.txt'
  show = 'import os; print(sorted(os.sched_getaffinity(0)), os.environ["OMP_NUM_THREADS"])'
  codes = []
  worker = threading.Thread(  # the pin is the calling thread's, as in run_jobs
    target=lambda: codes.append(
      run_suite.subprocess_runner([sys.executable, '-c', show], str(log), frozenset({cpu}))
    )
  )
  worker.start()
  worker.join()
  assert codes == [0] and log.read_text() == f'[{cpu}] 1\n'
  assert os.sched_getaffinity(0) == mask  # this thread is not pinned


def test_a_preempted_run_is_neither_done_nor_failed_and_stops_the_suite(tmp_path):
  workdir = str(tmp_path)
  jobs = suites.expand([_toy_run('a'), _toy_run('b')], workdir)
  calls = []

  def preempted_runner(command, log_path, cpus):
    calls.append(command)
    return EXIT_PREEMPTED  # what main.py exits with after a SIGTERM, its state saved

  results = run_suite.run_jobs(jobs, workdir, preempted_runner)
  assert results == {'ok': [], 'failed': [], 'skipped': [], 'preempted': ['a/seed0']}
  assert len(calls) == 1  # the machine is going away: b is left for the rerun
  assert not (tmp_path / 'a' / 'seed0' / 'DONE').exists()
  assert not (tmp_path / 'a' / 'seed0' / 'FAILED').exists()
  # The rerun trains it again (main.py resumes from its checkpoint).
  assert run_suite.run_jobs(jobs, workdir, lambda c, p, cpus: 0)['ok'] == ['a/seed0', 'b/seed0']


def test_manifest_merges_runs_of_earlier_calls_in_suite_order(tmp_path):
  suite = suites.SUITES['cifar10_degradation']
  run_suite.write_manifest(
    str(tmp_path), 'cifar10_degradation', suite, suites.select_runs(suite, [56]), 1, 0.1
  )
  run_suite.write_manifest(
    str(tmp_path), 'cifar10_degradation', suite, suites.select_runs(suite, [20]), 1, 0.1
  )
  manifest = json.loads((tmp_path / 'suite.json').read_text())
  assert [r['name'] for r in manifest['runs']] == [
    'cifar_plain20',
    'cifar_plain56',
    'cifar_resnet20',
    'cifar_resnet56',
  ]
  assert manifest['runs'][2]['paper_error'] == 8.75


def test_driver_trains_with_main_py_then_skips_and_reports(tmp_path, monkeypatch):
  """A real 4-step smoke run (synthetic data) through main.py, then the report of it."""
  # One CPU device in the child, not conftest's 8: faster, and 8 devices' collectives can
  # time out on a busy 2-core machine.
  monkeypatch.setenv('XLA_FLAGS', xla_flags(1))
  workdir = str(tmp_path)
  suite = suites.Suite('smoke', 'none', (_toy_run('smoke'),))
  # 20 steps -> 4, eval every 2 (on 1000 synthetic images: 5 batches of 200).
  jobs = suites.expand(suite.runs, workdir, steps_scale=0.2, sets={'eval_batch_size': '200'})
  assert _flags(jobs[0].command)['config.num_train_steps'] == '4'
  run_suite.write_manifest(workdir, 'smoke', suite, suite.runs, 1, 0.2)
  assert run_suite.run_jobs(jobs, workdir)['ok'] == ['smoke/seed0'], (
    tmp_path / 'smoke' / 'seed0' / 'log.txt'
  ).read_text()[-3000:]
  rows = read_metrics(str(tmp_path / 'smoke' / 'seed0'))
  assert [r['step'] for r in rows if 'eval_top1' in r] == [2, 4]
  assert run_suite.run_jobs(jobs, workdir)['skipped'] == ['smoke/seed0']
  results = report.build_report(workdir, str(tmp_path / 'report'))
  assert results['runs'][0]['seeds']['0']['final_step'] == 4
  assert (tmp_path / 'report' / 'curves.png').stat().st_size > 0


def test_stack_groups_twins_and_seeds_into_one_program_each(tmp_path):
  suite = suites.SUITES['cifar10_degradation']
  runs = suites.select_runs(suite, [20, 110])
  jobs = suites.expand_stacked(runs, str(tmp_path), seeds=2, steps_scale=0.01)
  # Plain-20 and ResNet-20 share a program; the 110s do not (only ResNet-110 warms up).
  assert [j.directory for j in jobs] == [
    'stacks/cifar_plain20+cifar_resnet20',
    'stacks/cifar_plain110',
    'stacks/cifar_resnet110',
  ]
  flags = _flags(jobs[0].command)
  assert flags['config.stack_seeds'] == '(0,1,0,1)'
  assert flags['config.stack_residual'] == '(False,False,True,True)'
  assert flags['config.num_train_steps'] == '640'
  assert jobs[0].command[2] == '--config=configs/cifar10.py:resnet20'
  assert jobs[0].members[1] == (
    'cifar_plain20/seed1',
    'stacks/cifar_plain20+cifar_resnet20/plain_seed1',
  )
  # Twins with parameters in their shortcuts (option B) cannot share a program.
  option_b = suites.expand_stacked(runs[:2], str(tmp_path), sets={'model_overrides.shortcut': 'B'})
  assert len(option_b) == 2


def test_stacked_driver_trains_with_main_py_links_members_and_reports(tmp_path, monkeypatch):
  """A plain/residual pair of smoke nets as one 4-step stack through main.py."""
  monkeypatch.setenv('XLA_FLAGS', xla_flags(1))
  workdir = str(tmp_path)
  plain = suites.Run('plain', SMOKE, 'plain', 20, False, 'plain nets', {'model': 'cifar_plain20'})
  suite = suites.Suite('smoke', 'none', (plain, _toy_run('resnet')))
  sets = {'eval_batch_size': '200'}
  jobs = suites.expand_stacked(suite.runs, workdir, steps_scale=0.2, sets=sets)
  assert len(jobs) == 1 and jobs[0].directory == 'stacks/plain+resnet'
  run_suite.write_manifest(workdir, 'smoke', suite, suite.runs, 1, 0.2)
  log = tmp_path / 'stacks' / 'plain+resnet' / 'log.txt'
  assert run_suite.run_jobs(jobs, workdir)['ok'] == ['stacks/plain+resnet'], log.read_text()
  assert os.readlink(tmp_path / 'plain' / 'seed0') == '../stacks/plain+resnet/plain_seed0'
  for run in ('plain', 'resnet'):
    done = json.loads((tmp_path / run / 'seed0' / 'DONE').read_text())
    assert done['stack'] == {'directory': 'stacks/plain+resnet', 'members': 2}
  results = report.build_report(workdir, str(tmp_path / 'report'))
  finals = {r['name']: r['seeds']['0'] for r in results['runs']}
  assert {name: f['final_step'] for name, f in finals.items()} == {'plain': 4, 'resnet': 4}
  losses = {
    run: [r['train_loss'] for r in read_metrics(str(tmp_path / run / 'seed0')) if 'train_loss' in r]
    for run in ('plain', 'resnet')
  }
  assert len(losses['plain']) == 4 and losses['plain'] != losses['resnet']
  assert run_suite.run_jobs(jobs, workdir)['skipped'] == ['stacks/plain+resnet']


def test_stack_refuses_seed_dirs_of_unstacked_runs(tmp_path):
  jobs = suites.expand_stacked([_toy_run('a')], str(tmp_path))
  os.makedirs(tmp_path / 'a' / 'seed0')
  with pytest.raises(UserError, match='holds an unstacked run'):
    run_suite.link_members(jobs[0], str(tmp_path))
  assert not os.path.islink(tmp_path / 'a' / 'seed0')


def _write_seed(workdir, run, seed, train_top1, eval_top1, seconds=None):
  """metrics.jsonl rows at steps 10 and 20 (eval at 20), and DONE if `seconds`."""
  run_dir = os.path.join(workdir, run, f'seed{seed}')
  os.makedirs(run_dir)
  rows = [
    {'step': 10, 'train_loss': 2.0, 'train_top1': train_top1[0], 'lr': 0.1},
    {'step': 20, 'train_loss': 1.0, 'train_top1': train_top1[1], 'lr': 0.1},
    {'step': 20, 'eval_loss': 1.0, 'eval_top1': eval_top1, 'eval_count': 100},
  ]
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if seconds is not None:
    with open(os.path.join(run_dir, 'DONE'), 'w') as f:
      json.dump({'command': 'python main.py', 'seconds': seconds}, f)


def test_report_table_json_and_plot_from_metrics(tmp_path):
  workdir, out = str(tmp_path / 'suite'), str(tmp_path / 'out')
  runs = (
    _toy_run('p20', 'plain-20', residual=False, panel='plain nets'),
    _toy_run('r20', 'ResNet-20', paper_error=8.75),
    _toy_run('r56', 'ResNet-56', depth=56, paper_error=6.97),
  )
  suite = suites.Suite('toy Fig. 6', 'test error, Table 6', runs)
  run_suite.write_manifest(workdir, 'toy', suite, runs, 2, 1.0)
  _write_seed(workdir, 'p20', 0, (0.5, 0.6), 0.55, seconds=120)
  _write_seed(workdir, 'p20', 1, (0.3, 0.7), 0.65, seconds=180)
  _write_seed(workdir, 'r20', 0, (0.8, 0.9), 0.88)

  results = report.build_report(workdir, out)
  table = (tmp_path / 'out' / 'table.md').read_text().splitlines()
  assert table[0].startswith('| net | seeds | steps | train error % | test error % | paper: test')
  assert table[2:5] == [  # errors 40 and 30 -> 35 +- 7.07; 45 and 35 -> 40 +- 7.07
    '| plain-20 | 2 | 20 | 35.00 ± 7.07 | 40.00 ± 7.07 | - | 2.5 ± 0.7 |',
    '| ResNet-20 | 1 | 20 | 10.00 | 12.00 | 8.75 | - |',
    '| ResNet-56 | 0 | - | - | - | 6.97 | - |',
  ]
  saved = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert saved == json.loads(json.dumps(results))
  p20 = saved['runs'][0]
  assert p20['mean_curves']['train'] == [[10, pytest.approx(60.0)], [20, pytest.approx(35.0)]]
  assert p20['mean_curves']['test'] == [[20, pytest.approx(40.0)]]
  assert p20['seeds']['1']['train'] == [[10, pytest.approx(70.0)], [20, pytest.approx(30.0)]]
  assert p20['summary']['final_test_error']['std'] == pytest.approx(7.0710678)
  assert (tmp_path / 'out' / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_report_without_a_suite_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='run_suite.py'):
    report.build_report(str(tmp_path), str(tmp_path))


def test_plot_colors_follow_depth_across_panels_and_nets_within_one_depth():
  runs = [
    {'name': name, 'depth': depth, 'panel': panel}
    for name, depth, panel in [
      ('plain20', 20, 'plain nets'),
      ('plain56', 56, 'plain nets'),
      ('resnet56', 56, 'ResNets'),  # no ResNet-20: ResNet-56 still matches plain-56
      ('resnet56_A', 56, 'ResNet-56'),
      ('resnet56_B', 56, 'ResNet-56'),
    ]
  ]
  assert report.colors(runs) == {
    'plain20': 'C0',
    'plain56': 'C1',
    'resnet56': 'C1',
    'resnet56_A': 'C0',
    'resnet56_B': 'C1',
  }


def test_a_single_evaluation_is_drawn_as_a_visible_point():
  import matplotlib.pyplot as plt

  run = {
    'name': 'resnet20',
    'label': 'ResNet-20',
    'mean_curves': {'train': [(100, 80.0), (200, 70.0)], 'test': [(200, 75.0)]},
  }
  fig, ax = plt.subplots()
  top = report._draw_panel(ax, [run], {'resnet20': 'C0'})
  train, test = ax.get_lines()
  assert top == 80.0
  assert train.get_marker() in ('None', None, '') and train.get_linestyle() == '--'
  assert test.get_marker() == 'o' and list(test.get_xdata()) == [200]
  labels = {h.get_label(): h.get_marker() for h in ax.get_legend().legend_handles}
  assert labels['test'] == 'o'
  plt.close(fig)
