"""The console scripts' entry point.

Its first lines record stop signals (see `stopsignals`), before the command line and everything it
needs are imported: from here on, no SIGINT, SIGTERM or SIGHUP is lost.
"""

from fuse_disk_export import stopsignals

stopsignals.record()


def main() -> int:
    from fuse_disk_export.cli import exit_now
    from fuse_disk_export.cli import main as cli_main

    # Without interpreter teardown: it would restore the signals' default actions, and a stop
    # signal in that last moment would end us with a status other than the one we report.
    exit_now(cli_main())
