"""The data layer's errors. `laasp_dist.errors` re-exports them, so the CLI reports them like its own."""


class UserFacingError(Exception):
    """An error that reaches the user as one clear line: bad config, data, checkpoint or argument."""


class DataError(UserFacingError):
    """A data set is missing, empty, corrupt or too small for what was asked."""
