class UserError(Exception):
    """A mistake in the user's input (config, file, data): reported without a traceback."""
