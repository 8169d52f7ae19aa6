"""The comparison table of a results.jsonl written by gpu_check.sh (or any RESULT lines).

    python -m benchmarks.compare results.jsonl

One row per resnet_jax measurement: images/s against torchvision's torch.compile and eager
runs of the same model and batch (bf16 rows only: the reference is bf16 autocast), their
ratio, peak memory of both, compile time, MFU and the loss check; then the precision rows
and the full-loop rows. MFU counts the model's FLOPs (6 x MACs per image): XLA's cost
analysis leaves out cuDNN's convolutions, which are custom calls on GPUs.
"""

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

GIB = 2**30
TARGET_SPEEDUP = 1.25  # issue 7: >= 1.25x torch.compile's img/s, peak memory <= torch's
TARGET_LOOP_FRACTION = 0.9  # issue 7: the full loop within 10% of the harness's img/s


def load(lines: Iterable[str]) -> list[dict[str, Any]]:
  """Result rows from JSON lines, with or without the `RESULT ` prefix; others skipped."""
  rows = []
  for line in lines:
    line = line.strip().removeprefix('RESULT ').strip()
    if line.startswith('{'):
      rows.append(json.loads(line))
  return rows


def _torch(
  rows: Sequence[dict[str, Any]], jax_row: dict[str, Any], variant: str
) -> dict[str, Any] | None:
  """The last torchvision row of `variant` for the same model, batch and image size."""
  if jax_row['dtype'] != 'bfloat16':
    return None
  found = None
  for r in rows:
    if (
      r.get('who') == 'torchvision'
      and r.get('variant') == variant
      and r.get('model') == jax_row['model']
      and r.get('batch') == jax_row['batch']
      and r.get('image') == jax_row['image_size']
    ):
      found = r
  return found


# What makes two rows time the same step (before model overrides and XLA flags).
STEP_KEYS = ('model', 'batch', 'image_size', 'dtype')


def _harness_rows(rows: Sequence[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
  """The harness rows (train_throughput) of `row`'s model, batch, image size and dtype."""
  return [
    r for r in rows if r.get('who') == 'resnet_jax' and all(r.get(k) == row[k] for k in STEP_KEYS)
  ]


def _harness(rows: Sequence[dict[str, Any]], loop_row: dict[str, Any]) -> dict[str, Any] | None:
  """The last harness row of the same step (model, batch, image size, dtype, overrides)."""
  overrides = loop_row.get('model_overrides') or {}
  same = [r for r in _harness_rows(rows, loop_row) if (r.get('model_overrides') or {}) == overrides]
  return same[-1] if same else None


def _default_img_per_s(rows: Sequence[dict[str, Any]], row: dict[str, Any]) -> float | None:
  """Mean img/s of the default step's rows (no model overrides, no extra XLA flags) of the
  same model, batch, image size and dtype: the baseline a variant is an A/B against.
  A default row measured again later shows the card's drift against the same mean."""
  speeds = [
    r['img_per_s']
    for r in _harness_rows(rows, row)
    if not r.get('model_overrides') and not r.get('extra_xla_flags')
  ]
  return sum(speeds) / len(speeds) if speeds else None


def _gib(n: float | None) -> str:
  return '-' if n is None else f'{n / GIB:.2f}'


def _num(x: float | None, fmt: str) -> str:
  return '-' if x is None else format(x, fmt)


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The comparison as aligned text lines."""
  head = (
    'label',
    'model',
    'batch',
    'dtype',
    'jax img/s',
    'compiled',
    'ratio',
    'vs default',
    'eager',
    'jax GiB',
    'torch GiB',
    'mem ratio',
    'compile s',
    'MFU',
    'loss',
    'target',
  )
  out = [head]
  for r in rows:
    if r.get('who') != 'resnet_jax':
      continue
    compiled, eager = _torch(rows, r, 'bf16_compiled'), _torch(rows, r, 'bf16_eager')
    ratio = r['img_per_s'] / compiled['img_per_s'] if compiled else None
    default = _default_img_per_s(rows, r)
    vs_default = r['img_per_s'] / default if default else None
    torch_peak = compiled.get('peak_bytes') if compiled else None
    jax_peak = r.get('peak_bytes_in_use')
    mem_ratio = jax_peak / torch_peak if jax_peak and torch_peak else None
    loss_ok = r['finite'] and r['loss_last'] < r['loss_first']
    target = '-'
    if ratio is not None and mem_ratio is not None:
      target = 'met' if ratio >= TARGET_SPEEDUP and mem_ratio <= 1 else 'missed'
    out.append(
      (
        r.get('label') or '-',
        r['model'],
        str(r['batch']),
        r['dtype'],
        f'{r["img_per_s"]:.0f}',
        _num(compiled and compiled['img_per_s'], '.0f'),
        _num(ratio, '.2f'),
        '-' if vs_default is None else f'{vs_default - 1:+.1%}',
        _num(eager and eager['img_per_s'], '.0f'),
        _gib(jax_peak),
        _gib(torch_peak),
        _num(mem_ratio, '.2f'),
        f'{r["compile_s"]:.1f}{" (cache)" if r.get("cache_hit") else ""}',
        _num(r.get('model_mfu'), '.1%'),
        f'{r["loss_first"]:.2f}->{r["loss_last"]:.2f} {"ok" if loss_ok else "BAD"}',
        target,
      )
    )
  widths = [max(len(line[i]) for line in out) for i in range(len(head))]
  lines = ['  '.join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in out]
  for r in rows:
    if r.get('who') == 'precision':
      lines.append(
        f'precision {r["model"]} batch {r["batch"]}: logits rel. err. float32 '
        f'{r["rel_err_float32"]:.1e}, bfloat16 {r["rel_err_bfloat16"]:.1e} '
        f'(input rounding alone {r["rel_err_input_rounding"]:.1e}) '
        f'{"ok" if r["ok"] else "OVER BOUND"}'
      )
    elif r.get('who') == 'resnet_jax_loop':
      harness = _harness(rows, r)
      fraction = r['img_per_s'] / harness['img_per_s'] if harness else None
      verdict = '-' if fraction is None else 'met' if fraction >= TARGET_LOOP_FRACTION else 'missed'
      lines.append(
        f'full loop {r["model"]} batch {r["batch"]} {r["dtype"]}: {r["img_per_s"]:.0f} img/s, '
        f'harness {_num(harness and harness["img_per_s"], ".0f")}, '
        f'ratio {_num(fraction, ".3f")} (target >= {TARGET_LOOP_FRACTION}) {verdict}'
      )
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Print the table of the JSON-lines file named in `argv`."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print('usage: python -m benchmarks.compare RESULTS.jsonl', file=sys.stderr)
    return 2
  with open(argv[0]) as f:
    print(table(load(f)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
