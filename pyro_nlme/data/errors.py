"""The one exception type of the data layer."""


class DataError(ValueError):
    """Invalid input data. The message names the file (or ``DataFrame``), column, row and id at
    fault.

    Rows are reported as 1-based line numbers of the file, header included (the first data row
    is line 2), or as index labels for a ``DataFrame``.
    """
