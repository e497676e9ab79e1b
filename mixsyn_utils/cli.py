"""Command-line plumbing every script shares: bad input ends as one line on stderr and exit status 2.

One rule for every way a command line can be wrong: an `InputError` raised by a check (`run_cli`) and an error of
argparse itself (`ArgumentParser.error`: a value of the wrong type, an unknown flag, a missing required flag) both
end in `exit_with_error`, which prints `error: <message>` once, on the launcher's rank 0, and exits 2 on every
rank. `ArgumentParser` also reads every `type=float` flag as a finite number (`finite_float`).
"""

import argparse
import math
import os
import sys


class InputError(ValueError):
    """Bad user input: a flag, file or dataset. Scripts print it as one line and exit 2."""


def first_line(error):
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def launch_rank():
    """This process's global rank under a launcher (`accelerate launch`, torchrun: RANK, else LOCAL_RANK); 0 when
    run alone. Known before any process group exists, so a refusal at parse time needs no accelerator."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def exit_with_error(message):
    """Print `error: <message>` on stderr (on rank 0 only, so N processes print it once) and exit 2 on every rank.

    Every rank stops at once: the processes of one launch check the same flags and inputs, and a rank that is
    still running is stopped by the launcher when one exits with a failure status.
    """
    if launch_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def finite_float(text):
    """argparse type of every `type=float` flag: a float that is neither NaN nor ±inf.

    NaN passes every range check written as comparisons the wrong way, and ±inf passes a bound on the other
    side; no flag of these scripts means either."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (`exit_with_error`: `error: argument --flag: ...`, exit 2, no usage
    block) and `type=float` flags read by `finite_float` (the flag's `type` stays `float`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message):
        exit_with_error(message)


def run_cli(main, parse_args):
    """Entry point of every script: `main(parse_args())`, with `InputError` printed as one line, exit 2."""
    try:
        main(parse_args())
    except InputError as error:
        exit_with_error(error)
