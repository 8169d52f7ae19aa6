"""Our training step beside a PyTorch step of the same work, in one process, alternating.

    python -m benchmarks.cpu_vs_torch --models mnist_resnet34,cifar_resnet20 --batch 128

For each model: our jitted train step (benchmarks.train_throughput's, SGD with Nesterov
momentum and weight decay, BN in training mode, a synthetic batch resident on the device)
and a plain PyTorch script of the same network and update (eager, NCHW and channels_last;
torchvision's layout for the ImageNet-stem nets, the paper's option-A CIFAR ResNet for
the CIFAR nets). Windows of `--steps` steps alternate between them, so both see the same
machine; each figure is the median window. Prints one `RESULT` row per model with every
variant's images/s and our ratio to PyTorch's best. `--dtype bf16` runs ours in bfloat16
and PyTorch under bf16 autocast.

PyTorch is optional and never a project dependency: pip install torch (CPU build) in a
separate venv or beside the project to run this.
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from benchmarks import train_throughput as tt
from resnet_jax import models
from resnet_jax.models.ops import onednn
from resnet_jax.models.ops.cpu_info import cpu_model

TORCH_HINT = 'PyTorch is not installed: pip install torch (CPU build) to run this benchmark.'


def torch_resnet(name: str, num_classes: int, channels: int) -> Any:
  """`name` (basic blocks only) as a torch.nn.Module: torchvision's layout for the
  ImageNet stem, the paper's CIFAR net (3x3 stem, option-A shortcuts) for the CIFAR stem."""
  import torch
  from torch import nn

  spec = models.model_kwargs(name, {'num_classes': num_classes})
  if spec.get('block', 'basic') != 'basic':
    raise SystemExit(f'error: {name} has bottleneck blocks; this benchmark builds basic ones.')
  option_a = spec.get('shortcut', 'B') == 'A'

  class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin
      self.proj = None
      if (stride != 1 or cin != cout) and not option_a:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      if self.proj is not None:
        s = self.proj(x)
      elif self.stride != 1 or self.extra:
        s = nn.functional.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
      else:
        s = x
      return torch.relu(y + s)

  width = spec.get('stem_width', 64)
  if spec.get('stem', 'imagenet') == 'imagenet':
    stem = [nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    stem.append(nn.MaxPool2d(3, 2, 1))
  else:
    stem = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
  layers, cin = [], width
  widths = spec.get('stage_widths', (64, 128, 256, 512))
  for i, (size, cout) in enumerate(zip(spec['stage_sizes'], widths, strict=True)):
    for j in range(size):
      layers.append(Basic(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*stem, *layers, *head)


def torch_step(
  name: str, batch: int, image: int, channels: int, classes: int, layout: str, bf16: bool
) -> Callable[[], None]:
  """One PyTorch training step of `name` on a fixed synthetic batch, as a closure."""
  import torch

  torch.manual_seed(0)
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  model = torch_resnet(name, classes, channels).to(memory_format=fmt).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
  x = torch.randn(batch, channels, image, image).to(memory_format=fmt)
  y = torch.randint(0, classes, (batch,))

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  return step


class OurStep:
  """Our jitted train step on a resident synthetic batch; each call runs one step."""

  def __init__(
    self, name: str, batch: int, dtype: str, overrides: Sequence[str], imagenet_size: int
  ):
    size = models.default_input(name)[0]
    argv = ['--model', name, '--batch', str(batch), '--dtype', dtype]
    argv += [
      '--compilation_cache_dir',
      '',
      '--image_size',
      str(imagenet_size if size == 224 else size),
    ]
    args = tt.parse_args(argv + [a for o in overrides for a in ('--model_override', o)])
    self._run = tt.prepare(args)
    self._state = self._run.state
    self.image, self.channels = args.image_size, args.channels
    self.classes = self._run.model.num_classes

  def __call__(self) -> None:
    self._state, _ = self._run.step_fn(self._state, self._run.batches[0])

  def sync(self) -> None:
    jax.block_until_ready(self._state)


def alternate(steps: dict[str, Callable[[], None]], n: int, windows: int) -> dict[str, float]:
  """Median seconds per step of each closure over `windows` alternating windows."""
  samples: dict[str, list[float]] = {k: [] for k in steps}
  for _ in range(windows):
    for k, step in steps.items():
      sync = getattr(step, 'sync', lambda: None)
      t0 = time.perf_counter()
      for _ in range(n):
        step()
      sync()
      samples[k].append((time.perf_counter() - t0) / n)
  return {k: statistics.median(v) for k, v in samples.items()}


def compare(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """One RESULT row: our images/s, PyTorch's per layout, and the ratios."""
  import torch

  ours = OurStep(name, args.batch, args.dtype, args.model_override, args.imagenet_size)
  steps = {'resnet_jax': ours}
  if args.xla_baseline:  # the same step with XLA's convolutions: the before of conv_impl
    overrides = [*args.model_override, 'conv_impl=xla']
    steps['resnet_jax_conv_xla'] = OurStep(
      name, args.batch, args.dtype, overrides, args.imagenet_size
    )
  for layout in args.torch_layouts.split(','):
    steps[f'torch_{layout}'] = torch_step(
      name, args.batch, ours.image, ours.channels, ours.classes, layout, args.dtype == 'bf16'
    )
  for step in steps.values():  # compile / warm up
    for _ in range(args.warmup):
      step()
    getattr(step, 'sync', lambda: None)()
  seconds = alternate(steps, args.steps, args.windows)
  img_per_s = {k: round(args.batch / s, 1) for k, s in seconds.items()}
  best = max((k for k in img_per_s if k.startswith('torch_')), key=img_per_s.get)
  return {
    'model': name,
    'batch': args.batch,
    'image_size': ours.image,
    'dtype': args.dtype,
    'model_overrides': args.model_override,
    'img_per_s': img_per_s,
    'best_torch': best,
    'ratio_vs_best_torch': round(img_per_s['resnet_jax'] / img_per_s[best], 3),
    'ratio_conv_xla_vs_best_torch': (
      round(img_per_s['resnet_jax_conv_xla'] / img_per_s[best], 3) if args.xla_baseline else None
    ),
    'step_ms': {k: round(1000 * s, 1) for k, s in seconds.items()},
    'windows': args.windows,
    'steps': args.steps,
    'torch': torch.__version__,
    'torch_threads': torch.get_num_threads(),
    'jax': jax.__version__,
    'host_cpu': cpu_model(),
    'host_cores': os.cpu_count(),
    # An AVX2 or SSE4.1 CPU emulated on a newer one: the ISA caps of both oneDNNs, XLA, ATen.
    'onednn_isa': onednn.effective_isa(),
    'isa_caps': {
      k: os.environ[k]
      for k in ('ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'XLA_FLAGS')
      if k in os.environ
    },
  }


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='mnist_resnet34,cifar_resnet20,cifar_resnet56,resnet18')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
  p.add_argument('--imagenet_size', type=int, default=64, help='image size of resnet*/plain*')
  p.add_argument('--torch_layouts', default='nchw,channels_last')
  p.add_argument('--steps', type=int, default=3, help='steps per timed window')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--warmup', type=int, default=tt.WARMUP_STEPS, help='untimed steps of each')
  p.add_argument('--model_override', action='append', default=[], help='FIELD=VALUE, ours')
  p.add_argument(
    '--xla_baseline',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='also time our step with conv_impl=xla',
  )
  args = p.parse_args(argv)
  try:
    import torch  # noqa: F401
  except ImportError:
    print(f'error: {TORCH_HINT}')
    return 2
  for name in args.models.split(','):
    print('RESULT', json.dumps(compare(name, args)), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
