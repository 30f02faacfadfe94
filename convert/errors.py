"""The converter's one error type: its message is a single line naming the file, key or shape at fault."""


class ConversionError(ValueError):
    pass
