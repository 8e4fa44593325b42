"""The one error type users see."""

from __future__ import annotations


class L2BError(Exception):
    """A problem with the user's input (a flag, a config key, a file, the data).

    The command line turns it into one line ``l2b: error: <message>`` and exit code 2. The
    message names the file, key or value at fault and says what to do.
    """


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' hint for a mistyped name, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(kind: str, name: str, choices) -> None:
    """Raise L2BError naming the valid choices when ``name`` is not one of them."""
    if name not in choices:
        valid = ", ".join(sorted(str(c) for c in choices))
        raise L2BError(f"unknown {kind} {name!r}{closest(name, choices)}; choose one of: {valid}")


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
