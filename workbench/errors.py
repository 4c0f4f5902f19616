"""Errors shown to the user as one clear line (no traceback) by the CLI and the UI."""


class WorkbenchError(Exception):
    """Base class: the message names the file, the field or tensor, and what was expected."""


class RecipeError(WorkbenchError, ValueError):
    """A recipe that does not validate."""
