"""Errors that mean "the user's input is wrong": the CLI prints them on one line and exits 2."""


class InputError(ValueError):
    """Bad input (config, data, environment) found before any work starts."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the file and the field."""


class SchemaError(InputError):
    """Data that does not match the config; the message names the file and the column."""
