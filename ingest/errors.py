"""The root error of streamcl and its families."""


class StreamclError(Exception):
    """Root of every error streamcl raises on purpose."""


class ConfigError(StreamclError):
    """A setting is missing, malformed or inconsistent; raised at start-up."""


class DataError(StreamclError):
    """A dataset or stream file cannot be found or read."""
