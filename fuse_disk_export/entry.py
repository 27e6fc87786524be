"""The console scripts' entry point.

Its first lines record stop signals (see `stopsignals`), before the command line and everything it
needs are imported: from here on, no SIGINT, SIGTERM or SIGHUP is lost.

Then the cycle collector is turned off until the exports are live (`export.serve` turns it back
on): the way there allocates much, in imports above all, and leaves no cyclic garbage worth
collecting; without the collector's passes over it, it is about 2 ms shorter (scripts/bench), and a
``-d`` daemon does not copy its parent's pages on writing to them just to walk them.
"""

import gc

from fuse_disk_export import stopsignals

stopsignals.record()
gc.disable()


def main() -> int:
    from fuse_disk_export.cli import exit_now
    from fuse_disk_export.cli import main as cli_main

    # Without interpreter teardown: it would restore the signals' default actions, and a stop
    # signal in that last moment would end us with a status other than the one we report.
    exit_now(cli_main())
