"""What CPU this is, as the measured tables and cached verdicts record it."""

import functools
import platform


@functools.cache
def cpu_model() -> str:
  """This machine's CPU model name (Linux: /proc/cpuinfo)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
