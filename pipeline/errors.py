"""The errors the CLI prints on one line: bad input (exit 2, nothing was written) and a
run that stopped for a known reason (exit 1, what was written stays as it was)."""


class InputError(ValueError):
    """Bad input (config, data, environment) found before any work starts."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the file and the field."""


class SchemaError(InputError):
    """Data that does not match the config; the message names the file and the column."""


class Stopped(RuntimeError):
    """Work that started and stopped for a reason the message states: a non-finite loss,
    NaN scores, a registration that failed after training. Exit 1."""
