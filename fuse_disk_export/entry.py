"""The console scripts' entry point.

Its first lines record stop signals (see `stopsignals`), before the command line and everything it
needs are imported: from here on, no SIGINT, SIGTERM or SIGHUP is lost.
"""

from fuse_disk_export import stopsignals

stopsignals.record()


def _standard_streams() -> None:
    """Descriptors 0, 1 and 2 open (on /dev/null where the caller closed them, as with
    ``>&-``): else the first file we open takes the number, and what we print goes into it;
    and Python, which found them closed, has None for the stream."""
    import os
    import sys

    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def main() -> int:
    _standard_streams()
    from fuse_disk_export.cli import exit_now
    from fuse_disk_export.cli import main as cli_main

    # Without interpreter teardown: it would restore the signals' default actions, and a stop
    # signal in that last moment would end us with a status other than the one we report.
    exit_now(cli_main())
