"""Placeholder: the original single file's vae keys are not mapped yet."""

from convert.errors import ConversionError

PREFIXES = ()


def present(keys):
    return False
