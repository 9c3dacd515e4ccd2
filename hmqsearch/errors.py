class UserError(Exception):
    """A mistake in the user's input (config, file, data): reported without a traceback."""


class RunHalted(Exception):
    """Training stopped on a problem found during the run (e.g. a non-finite loss): reported as one
    message; the run directory and its checkpoints are kept."""
