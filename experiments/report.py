"""Curves, table and JSON of a suite's runs, from their metrics.jsonl files.

    python experiments/report.py --workdir=DIR [--out=DIR]

Reads DIR/suite.json (written by experiments/run_suite.py) and DIR/<run>/seed<k>/
metrics.jsonl, and writes to OUT (default DIR):
- curves.png: the layout of the paper's Fig. 6: error (%) against iterations, training
  error dashed, test error solid, one panel per group of nets (plain left, ResNets right),
  one color per depth (per net in a panel of one depth); curves are the mean over seeds;
- table.md: final training and test error per net, mean +- std over seeds, beside the
  paper's number;
- results.json: all of it, per seed, curves included.
Training error is 1 - train_top1 as logged (the mean over each log window, on augmented
images with BatchNorm in training mode); test error is 1 - eval_top1.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

from experiments.run_suite import DONE_FILE, MANIFEST_FILE, read_json  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402
from resnet_jax.training.metrics import read_metrics  # noqa: E402

PLOT_FILE, TABLE_FILE, JSON_FILE = 'curves.png', 'table.md', 'results.json'
TABLE_NOTE = (
  'Errors in % at the last logged step. Train error: 1 - train_top1 averaged over the last '
  'log window (augmented images, BatchNorm in training mode); test error: 1 - eval_top1 on '
  'the whole eval split. Mean ± sample std over seeds.'
)
Curve = list[list[float]]  # [[step, error %], ...]


def _curve(rows: list[dict[str, Any]], key: str) -> Curve:
  """[step, 100 * (1 - key)] for rows that have `key`, one per step (the last logged)."""
  by_step = {r['step']: 100.0 * (1.0 - r[key]) for r in rows if key in r}
  return [[step, by_step[step]] for step in sorted(by_step)]


def seed_result(run_dir: str) -> dict[str, Any]:
  """One seed's curves, final errors, last step and time taken (from DONE, if finished)."""
  rows = read_metrics(run_dir)
  train, test = _curve(rows, 'train_top1'), _curve(rows, 'eval_top1')
  done_path = os.path.join(run_dir, DONE_FILE)
  done = read_json(done_path) if os.path.exists(done_path) else None
  return {
    'done': done is not None,
    'seconds': done['seconds'] if done else None,
    'final_step': max((r['step'] for r in rows), default=None),
    'final_train_error': train[-1][1] if train else None,
    'final_test_error': test[-1][1] if test else None,
    'train': train,
    'test': test,
  }


def mean_curve(curves: Sequence[Curve]) -> Curve:
  """The mean over seeds at the steps every seed logged."""
  common = set.intersection(*({s for s, _ in c} for c in curves)) if curves else set()
  values = [dict(map(tuple, c)) for c in curves]
  return [[s, statistics.fmean(v[s] for v in values)] for s in sorted(common)]


def stats(values: Sequence[float | None]) -> dict[str, Any]:
  """Mean and sample standard deviation (0 for one value) of the values present."""
  present = [v for v in values if v is not None]
  if not present:
    return {'n': 0, 'mean': None, 'std': None}
  std = statistics.stdev(present) if len(present) > 1 else 0.0
  return {'n': len(present), 'mean': statistics.fmean(present), 'std': std}


def _seed_dirs(workdir: str, run_name: str) -> dict[int, str]:
  seeds = {}
  for d in glob.glob(os.path.join(workdir, run_name, 'seed*')):
    if m := re.fullmatch(r'seed(\d+)', os.path.basename(d)):
      seeds[int(m.group(1))] = d
  return dict(sorted(seeds.items()))


def collect(workdir: str) -> dict[str, Any]:
  """The manifest of WORKDIR with, per run, its seeds' results and their statistics."""
  manifest_path = os.path.join(workdir, MANIFEST_FILE)
  if not os.path.exists(manifest_path):
    raise UserError(f'no {MANIFEST_FILE} in {workdir}; run experiments/run_suite.py there first.')
  results = read_json(manifest_path)
  for run in results['runs']:
    seeds = {k: seed_result(d) for k, d in _seed_dirs(workdir, run['name']).items()}
    run['seeds'] = {str(k): v for k, v in seeds.items()}
    run['summary'] = {
      key: stats([s[key] for s in seeds.values()])
      for key in ('final_train_error', 'final_test_error', 'seconds')
    }
    run['mean_curves'] = {
      key: mean_curve([s[key] for s in seeds.values() if s[key]]) for key in ('train', 'test')
    }
  return results


def _fmt(stat: dict[str, Any], digits: int = 2, scale: float = 1.0) -> str:
  if not stat['n']:
    return '-'
  mean = f'{stat["mean"] * scale:.{digits}f}'
  return mean if stat['n'] == 1 else f'{mean} ± {stat["std"] * scale:.{digits}f}'


def markdown_table(results: dict[str, Any]) -> str:
  """Final errors per net (mean ± sample std over seeds) beside the paper's numbers."""
  lines = [
    f'| net | seeds | steps | train error % | test error % | paper: {results["paper_metric"]} '
    '| minutes per run |',
    '|---|---|---|---|---|---|---|',
  ]
  for run in results['runs']:
    summary = run['summary']
    steps = sorted({s['final_step'] for s in run['seeds'].values() if s['final_step']})
    paper = '-' if run['paper_error'] is None else f'{run["paper_error"]:.2f}'
    lines.append(
      f'| {run["label"]} | {len(run["seeds"])} | '
      f'{", ".join(map(str, steps)) or "-"} | {_fmt(summary["final_train_error"])} | '
      f'{_fmt(summary["final_test_error"])} | {paper} | {_fmt(summary["seconds"], 1, 1 / 60)} |'
    )
  return '\n'.join([*lines, '', TABLE_NOTE]) + '\n'


def colors(runs: Sequence[dict[str, Any]]) -> dict[str, str]:
  """A color per run name: one per depth, shared by the panels (plain-20 and ResNet-20 match),
  unless a panel holds several nets of one depth (shortcut options): then one per net."""
  depths = sorted({run['depth'] for run in runs})
  result = {}
  for panel in dict.fromkeys(run['panel'] for run in runs):
    members = [run for run in runs if run['panel'] == panel]
    by_depth = len({run['depth'] for run in members}) == len(members)
    for i, run in enumerate(members):
      result[run['name']] = f'C{depths.index(run["depth"]) if by_depth else i}'
  return result


def _draw_panel(ax: Any, runs: Sequence[dict[str, Any]], color: dict[str, str]) -> float:
  """Training error dashed, test error bold (as in Fig. 6), one color per net; returns the
  largest error. Each evaluation is a marker, so a run evaluated once still shows its point;
  a training curve of a single logged step gets one too."""
  top = 0.0
  for run in runs:
    for key, style, width in (('train', '--', 1.0), ('test', '-', 2.0)):
      curve = run['mean_curves'][key]
      if curve:
        marker = 'o' if key == 'test' or len(curve) == 1 else None
        steps, errors = zip(*curve, strict=True)
        ax.plot(steps, errors, style, color=color[run['name']], linewidth=width, marker=marker)
        top = max(top, *errors)
  handles = [Line2D([], [], color=color[r['name']], linewidth=2, label=r['label']) for r in runs]
  handles += [
    Line2D([], [], color='gray', linestyle='--', linewidth=1, label='training'),
    Line2D([], [], color='gray', linewidth=2, marker='o', label='test'),
  ]
  ax.legend(handles=handles, fontsize=9)
  ax.set_xlabel('iterations')
  ax.grid(alpha=0.3)
  return top


def plot(results: dict[str, Any], path: str) -> None:
  """Fig. 6's layout: one panel per group of nets (plain left, ResNets right), shared y axis."""
  runs = results['runs']
  panels = list(dict.fromkeys(run['panel'] for run in runs))
  fig, axes = plt.subplots(
    1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True, squeeze=False
  )
  color = colors(runs)
  top = 0.0
  for ax, panel in zip(axes[0], panels, strict=True):
    top = max(top, _draw_panel(ax, [run for run in runs if run['panel'] == panel], color))
    ax.set_title(panel)
  axes[0][0].set_ylabel('error (%)')
  axes[0][0].set_ylim(0, min(100.0, top * 1.05) or 100.0)
  fig.suptitle(results['description'], fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_report(workdir: str, out: str) -> dict[str, Any]:
  """Writes curves.png, table.md and results.json of WORKDIR's suite to OUT; returns it all."""
  results = collect(workdir)
  os.makedirs(out, exist_ok=True)
  plot(results, os.path.join(out, PLOT_FILE))
  with open(os.path.join(out, TABLE_FILE), 'w') as f:
    f.write(markdown_table(results))
  with open(os.path.join(out, JSON_FILE), 'w') as f:
    json.dump(results, f, indent=1)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='The suite directory of run_suite.py.')
  parser.add_argument('--out', help='Where the report goes (default: the workdir).')
  args = parser.parse_args(argv)
  out = args.out or args.workdir
  try:
    results = build_report(args.workdir, out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(markdown_table(results), end='')
  print(f'wrote {", ".join(os.path.join(out, f) for f in (PLOT_FILE, TABLE_FILE, JSON_FILE))}')


if __name__ == '__main__':
  main()
