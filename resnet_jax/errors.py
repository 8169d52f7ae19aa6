"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
  """Bad input from the user (config, flags, data): reported as one line, exit code 2.

  The message names the problem and how to fix it; `main.py` prints it without a
  traceback. Internal bugs raise ordinary exceptions instead.
  """


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (read-only or full disk); the older ones are intact.

  Orbax's background threads for the failed save never finish, so the process must end
  without waiting for them (main.py does).
  """


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped early, state saved, rerun to resume


class Preempted(Exception):
  """The run stopped before its last step on a preemption notice (SIGTERM), its state
  saved: rerunning the same command resumes it. main.py exits with EX_TEMPFAIL (75), so a
  scheduler or the suite driver never takes a preempted run for a finished one."""


def first_line(e: BaseException, limit: int = 100) -> str:
  """The first line of an exception's message, shortened to `limit` characters."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  return line if len(line) <= limit else line[: limit - 3] + '...'
