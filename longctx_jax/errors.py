"""The project's exception type: bad input from a user, as opposed to a bug.

The CLI turns a :class:`LongctxError` into exit status 2 and a one-line message; any other
exception (a shape bug found while tracing, say) keeps its traceback.
"""


class LongctxError(ValueError):
    """A request, option, file or checkpoint that cannot be served; the message says which."""
