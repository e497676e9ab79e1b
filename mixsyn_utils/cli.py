"""Command-line plumbing every script shares: bad input ends as one line on stderr and exit status 2."""

import sys


class InputError(ValueError):
    """Bad user input: a flag, file or dataset. Scripts print it as one line and exit 2."""


def first_line(error):
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(main, parse_args):
    """Entry point of every script: `main(parse_args())`, with `InputError` printed as one line, exit 2."""
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
