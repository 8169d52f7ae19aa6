"""torch_reference.py's measurement with each variant's peak GPU memory added.

    python -m benchmarks.torch_memory --model resnet50 --batch 256 [--reference PATH]

Calls `measure` from the shared torch_reference.py (`--reference`, $TORCH_REFERENCE, or
the first of `CANDIDATES`) once per variant, with the same defaults as its own command
line, and prints its RESULT line with `peak_bytes` (torch.cuda.max_memory_allocated) and
`peak_reserved_bytes` added; the statistics are reset before each variant, and are null
where there is no CUDA. Runs the reference's code unchanged, so its images/s stand.
"""

import argparse
import gc
import importlib.util
import json
import os
import sys
import traceback
import types
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared beside a checkout; shared/ inside one (the GPU machines); a carried copy.
CANDIDATES = (
  REPO.parent / 'shared' / 'bench' / 'torch_reference.py',
  REPO / 'shared' / 'bench' / 'torch_reference.py',
  REPO / 'benchmarks' / 'carry' / 'torch_reference.py',
)


def find_reference(explicit: str | None = None) -> Path:
  """The torch_reference.py to use: `explicit`, else $TORCH_REFERENCE, else a candidate."""
  explicit = explicit or os.environ.get('TORCH_REFERENCE')
  paths = [Path(explicit)] if explicit else list(CANDIDATES)
  for path in paths:
    if path.is_file():
      return path
  raise FileNotFoundError(f'torch_reference.py not found; looked at {", ".join(map(str, paths))}')


def load_reference(path: Path) -> types.ModuleType:
  """Import torch_reference.py from `path` (it is a script, not a package module)."""
  spec = importlib.util.spec_from_file_location('torch_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: one RESULT line per variant; 1 if a variant failed."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--reference', default=None, help='path of torch_reference.py')
  p.add_argument('--model', default='resnet50')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--image', type=int, default=224)
  p.add_argument('--steps', type=int, default=40)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--variants', default='bf16_eager,bf16_compiled')
  p.add_argument('--label', default='', help='copied into each result row')
  a = p.parse_args(argv)
  path = find_reference(a.reference)
  reference = load_reference(path)
  torch = reference.torch
  failed = False
  for variant in a.variants.split(','):
    cuda = torch.cuda.is_available()
    if cuda:
      # The previous variant's model and optimizer are garbage by now; free their blocks.
      gc.collect()
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    try:
      row = reference.measure(a.model, variant, a.batch, a.image, a.steps, a.warmup)
    except Exception:  # one failed variant must not lose the others' results
      traceback.print_exc()
      failed = True
      continue
    row.update(
      peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
      peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
      label=a.label,
      reference=str(path),
    )
    print('RESULT ' + json.dumps(row), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
