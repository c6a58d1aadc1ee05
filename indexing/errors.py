"""The one exception type copyscan raises for problems a user can act on."""


class CopyscanError(Exception):
    """A problem with the input, the configuration or the storage that the user can fix.

    The message says what was wrong and what to do; the CLI prints it without a traceback.
    """
