"""What the export refuses: bad arguments, an unusable output path, weights a dtype cannot hold."""


class ExportError(ValueError):
    """Bad export arguments or weights that cannot be written as asked."""


class OutputPathError(ExportError):
    """The output path is a file, or a non-empty directory without overwrite."""


class Float16OverflowError(ExportError):
    """A tensor holds values beyond float16's range."""
