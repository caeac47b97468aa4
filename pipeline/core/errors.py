"""The one exception type users see.

Every problem a user can fix (bad CSV, missing image, typo in a config key) is raised as a
`PipelineError` whose message is one line naming the file, row or key and the fix. The CLI prints
that line and exits with status 2 instead of showing a traceback from deep inside a library.
"""


class PipelineError(Exception):
    """A user-fixable problem, reported as one line by the CLI."""


class DivergedError(PipelineError, FloatingPointError):
    """Training went non-finite (NaN or inf loss): one line for the train stage; a FloatingPointError,
    so tuning records the trial as failed (its sampled values diverge) and goes on."""
