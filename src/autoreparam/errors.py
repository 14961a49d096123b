"""Errors raised for bad input: one line each, naming the site, argument or file."""


class AutoreparamError(ValueError):
    """Base class of every error that autoreparam raises for bad input."""


class ModelError(AutoreparamError):
    """The model cannot be traced or analysed as written (names the site where possible)."""


class InputError(AutoreparamError):
    """An argument passed to autoreparam (model inputs, options, files) is not what was expected."""
