"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
  """Bad input from the user (config, flags, data): reported as one line, exit code 2.

  The message names the problem and how to fix it; `main.py` prints it without a
  traceback. Internal bugs raise ordinary exceptions instead.
  """
