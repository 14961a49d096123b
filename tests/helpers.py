"""Small assertions shared by the test files."""


def one_line(exc) -> str:
    """The message of an error, asserting it is one non-empty line."""
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, repr(msg)
    return msg
