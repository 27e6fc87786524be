"""The command line: argv in, messages and an exit status out.  No logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, cast

from fuse_disk_export import __version__, logs, stopsignals
from fuse_disk_export.engine.graph import AllowOther, Backing
from fuse_disk_export.errors import FdeError, UsageError, limit_reached
from fuse_disk_export.options import (
    AIO_MODES,
    ALLOW_OTHER_MODES,
    BACKING_MODES,
    CACHE_MODES,
    DETECT_ZEROES_MODES,
    DISCARD_MODES,
    Aio,
    Cache,
    DetectZeroes,
    Discard,
    Options,
)

if TYPE_CHECKING:  # table_reader loads only with --list-partitions
    from fuse_disk_export.table_reader import Disk

PROG = "fuse-disk-export"
USAGE = (
    "%(prog)s [options] IMAGE...\n"
    "       %(prog)s --list [--json] | --stop PATH|PID... | --doctor [--json] [IMAGE...]"
)

EXAMPLES = """\
examples:
  fuse-disk-export foo.qcow2 &             # prints one line once live; kill -SIGINT %1 reverts
  fuse-disk-export -dp fde.pid foo.qcow2   # returns once live; kill -SIGINT $(cat fde.pid) reverts

Images a guest could write to may be hostile: see the README's security note.
"""

#: What the options that --help leaves out do: the man page and the completions name them too.
HIDDEN_HELP = {
    "help": "show the help and exit",
    "images": "disk images, in any format QEMU reads; each is exported on its own path",
    "fs_type": "with --mount-fs: the filesystem type, when detection cannot tell",
    "json": "with --list or --doctor: print JSON",
    "nocache": "the same as --cache none (qemu-nbd's -n)",
    "version": "print the version and exit",
}

log = logging.getLogger("fuse_disk_export")


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help on one screen: one line per option (``-p, --pid-file PATH``, choices ``a|b``)."""

    def __init__(self, prog: str) -> None:
        width = shutil.get_terminal_size().columns
        super().__init__(prog, max_help_position=32, width=min(100, width) - 2)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        if action.metavar is None and action.choices is not None:
            metavar = "|".join(map(str, action.choices))
        else:
            metavar = str(action.metavar or action.dest.upper())
        dots = " ..." if action.nargs == "+" else ""
        return f"{', '.join(action.option_strings)} {metavar}{dots}"


def _discard_mode(value: str) -> str:
    """qemu-nbd's synonyms: off is ignore, on is unmap."""
    return {"off": "ignore", "on": "unmap"}.get(value, value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        add_help=False,
        description="Any disk image QEMU reads, seen as a raw image on its own path; "
        "SIGINT, SIGTERM or SIGHUP reverts.",
        epilog=EXAMPLES,
        formatter_class=_Help,
    )
    p.add_argument("-h", "--help", action="help", help=argparse.SUPPRESS)
    p.add_argument("images", nargs="*", metavar="IMAGE", help=argparse.SUPPRESS)
    p.add_argument(
        "-d",
        "--daemonize",
        action="store_true",
        help="run in the background; return once every export is live",
    )
    p.add_argument(
        "-p",
        "--pid-file",
        metavar="PATH",
        help="write the serving pid here once live; removed on revert",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument(
        "-f",
        "--format",
        metavar="FMT",
        help="image format of every image (skips detection), e.g. qcow2, raw",
    )
    p.add_argument(
        "--backing",
        choices=BACKING_MODES,
        default="safe",
        help="backing files: safe (default) plain files only; none; any (unsafe)",
    )
    p.add_argument(
        "--allow-other",
        choices=ALLOW_OTHER_MODES,
        default="auto",
        help="let other users access the exports (default auto: try, fall back)",
    )
    p.add_argument(
        "-m",
        "--mountpoint",
        metavar="FILE",
        help="export on FILE, not on the image (made if missing, then removed)",
    )
    p.add_argument(
        "--mountpoint-dir",
        metavar="DIR",
        help="with several images: export each on DIR/<its file name>",
    )
    p.add_argument(
        "-P",
        "--partition",
        type=int,
        metavar="N",
        help="export only partition N (MBR or GPT) of the virtual disk",
    )
    p.add_argument(
        "--list-partitions",
        action="store_true",
        help="print each IMAGE's partition table and exit (exports nothing)",
    )
    p.add_argument(
        "--mount-fs",
        metavar="DIR",
        help="mount the filesystem inside at DIR, rootless (--fs-type TYPE)",
    )
    p.add_argument("--fs-type", metavar="TYPE", help=argparse.SUPPRESS)
    p.add_argument(
        "--nbd-socket",
        metavar="PATH",
        help="also serve over NBD on this Unix socket (FUSE is then read-only)",
    )
    p.add_argument(
        "-s",
        "--snapshot",
        action="store_true",
        help="writes go to a temporary overlay (dropped)",
    )
    p.add_argument(
        "--overlay",
        metavar="FILE",
        help="writes go to FILE, a kept qcow2 over the image (made if missing)",
    )
    p.add_argument(
        "-l",
        "--load-snapshot",
        metavar="SNAPSHOT",
        help="export a qcow2 internal snapshot (name or id), read-only",
    )
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="LUKS passphrase (first line); else asked on the terminal",
    )
    p.add_argument(
        "--discard",
        choices=DISCARD_MODES,
        type=_discard_mode,
        default="unmap",
        help="discard/TRIM through the export: unmap (default) frees space",
    )
    p.add_argument(
        "--detect-zeroes",
        choices=DETECT_ZEROES_MODES,
        default="off",
        help="detect writes of zeroes, write them efficiently (default off)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="writeback",
        metavar="MODE",
        help="host cache mode, as in qemu-nbd (default writeback; -n: none)",
    )
    p.add_argument(
        "-n",
        "--nocache",
        dest="cache",
        action="store_const",
        const="none",
        help=argparse.SUPPRESS,  # qemu-nbd's; named in --cache's help
    )
    p.add_argument(
        "--aio",
        choices=AIO_MODES,
        metavar="MODE",
        help="AIO: threads, native (needs --cache none/directsync), io_uring",
    )
    p.add_argument(
        "--iothreads",
        metavar="N",
        type=int,
        help="I/O threads per export (default 4 with multi-queue FUSE)",
    )
    p.add_argument(
        "--no-write-guard",
        action="store_true",
        help="let writes run concurrently (only for a QEMU with the FUSE fix)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="with -d: log here (default: syslog, if /dev/log exists)",
    )
    p.add_argument(
        "--list", action="store_true", help="list live exports and exit (--json: as JSON)"
    )
    p.add_argument(
        "--doctor",
        action="store_true",
        help="check this machine can export (and each IMAGE); exit 1 if not",
    )
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--stop",
        nargs="+",
        metavar="PATH|PID",
        help="revert the exports on PATH or of PID; wait until done",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the plan, the commands run and tracebacks",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument(
        "-V",  # as in qemu-nbd
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help=argparse.SUPPRESS,
    )
    return p


READY_LINE = "All exports set up, ^C to revert"


def options_from(args: argparse.Namespace) -> Options:
    """The typed options of argv (argparse has checked every choice already)."""
    return Options(
        images=tuple(args.images),
        read_only=args.read_only,
        format=args.format,
        backing=cast(Backing, args.backing),
        allow_other=cast(AllowOther, args.allow_other),
        mountpoint=args.mountpoint,
        mountpoint_dir=args.mountpoint_dir,
        partition=args.partition,
        nbd_socket=args.nbd_socket,
        snapshot=args.snapshot,
        overlay=args.overlay,
        load_snapshot=args.load_snapshot,
        passphrase_file=args.passphrase_file,
        discard=cast(Discard, args.discard),
        detect_zeroes=cast(DetectZeroes, args.detect_zeroes),
        cache=cast(Cache, args.cache),
        aio=cast("Aio | None", args.aio),
        write_guard=not args.no_write_guard,
        iothreads=args.iothreads,
        pid_file=args.pid_file,
        mount_fs=args.mount_fs,
        fs_type=args.fs_type,
    )


def _ask_passphrase(images: Sequence[str]) -> str:
    if not sys.stdin.isatty():
        raise UsageError("is encrypted: give --passphrase-file FILE", path=images[0])
    import getpass

    with stopsignals.interruptible():  # a Ctrl-C at the prompt must not wait for Enter
        return getpass.getpass(f"Passphrase for {', '.join(images)}: ")


def _title(image: str, disk: Disk) -> str:
    """The listing's first line: the table, or what the disk holds without one."""
    scheme = disk.table.scheme
    if disk.table.partitions or disk.whole is None:
        kind = f"{scheme.upper()} partition table" if scheme != "none" else "no partition table"
        return f"{image}: {kind}"
    # A filesystem (or LUKS, LVM, swap) on the whole disk: say so, rather than "no partitions".
    if scheme == "none":
        return f"{image}: no partition table; the whole disk holds {disk.whole}"
    return f"{image}: {scheme.upper()} with no partitions; the whole disk holds {disk.whole}"


def _print_tables(options: Options) -> int:
    from fuse_disk_export.partitions import TABLE_HEADINGS, format_table
    from fuse_disk_export.request import partition_tables

    headings = (*TABLE_HEADINGS, "content")
    for image, disk in partition_tables(options, ask_passphrase=_ask_passphrase):
        rows = [
            (*row, disk.filesystems.get(p.number) or "-")
            for row, p in zip(format_table(disk.table), disk.table.partitions, strict=True)
        ]
        title = _title(image, disk)
        if not rows:
            print(title)
        elif sys.stdout.isatty():
            from rich.console import Console
            from rich.table import Table

            view = Table(*headings, title=title)
            for row in rows:
                view.add_row(*row)
            Console().print(view)
        else:
            from fuse_disk_export.columns import plain_columns

            print(title)
            print(plain_columns([headings, *rows]), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.doctor:
        with stopsignals.interruptible():
            return _doctor(args)
    if args.list or args.stop:
        with stopsignals.interruptible():
            return _manage(args)
    if args.json:
        raise UsageError("--json goes with --list or --doctor")
    if args.log_file == "":
        raise UsageError("--log-file needs a path (it was given an empty one)")
    if args.log_file and not args.daemonize:
        raise UsageError("--log-file goes with -d (in the foreground, messages go to stderr)")
    options = options_from(args)
    if args.list_partitions:
        return _print_tables(options)

    from fuse_disk_export.lifecycle import serve
    from fuse_disk_export.request import build_request

    request = build_request(options, ask_passphrase=_ask_passphrase)
    log.debug("request built")
    stopsignals.check()
    if not args.daemonize:

        def ready(_warnings: Sequence[str]) -> None:
            # The warnings are on stderr already.
            if not args.quiet:
                logs.say(READY_LINE)

        exit_now(serve(request, on_live=ready))

    from fuse_disk_export.background import Reporter, run_detached

    log_file = logs.open_log_file(args.log_file) if args.log_file else None

    def work(reporter: Reporter) -> int:
        # A daemon logs from INFO up: what it did, to syslog or --log-file.
        logs.setup_daemon(log_file, verbose=args.verbose)
        try:
            return serve(request, on_live=reporter.ready, cancel=reporter)
        except FdeError as e:
            # The one place a -d run's failure is reported: to the waiting parent if it has not
            # heard "live" (it prints the line), and to the log.
            reporter.failed(e)
            log.error("%s", e)
            return e.exit_status
        except Exception:
            log.exception("internal error")
            raise

    return run_detached(work, log_stream=log_file)


def _manage(args: argparse.Namespace) -> int:
    from fuse_disk_export import manage

    if args.images or (args.list and args.stop):
        raise UsageError("--list and --stop take no images and go alone")
    if args.list:
        return manage.list_exports(as_json=args.json)
    return manage.stop(args.stop, quiet=args.quiet)


def _doctor(args: argparse.Namespace) -> int:
    if args.list or args.stop:
        raise UsageError("--doctor goes without --list and --stop")
    from fuse_disk_export import doctor
    from fuse_disk_export.images import ImageOptions

    # What inspecting the images warns about is in the report: not on stderr as well.
    logs.setup_terminal(verbose=args.verbose, quiet=True)
    checks = doctor.machine(allow_other_mode=args.allow_other)
    options = ImageOptions(format=args.format, read_only=args.read_only, backing=args.backing)
    images = [doctor.image(image, options) for image in args.images]
    if args.json:
        import json

        print(json.dumps(doctor.as_json(checks, images), indent=2))
    elif sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape

        console = Console(highlight=False)
        for line in doctor.lines([*checks, *images]):
            style = "green" if line.startswith("✔") else "red" if line.startswith("✘") else ""
            console.print(f"[{style}]{escape(line[:1])}[/]{escape(line[1:])}" if style else line)
    else:
        utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
        for line in doctor.lines([*checks, *images], marks=("✔", "✘") if utf8 else ("ok", "X")):
            print(line)
    return 0 if doctor.healthy([*checks, *images]) else 1


def exit_now(status: int) -> NoReturn:
    """Exit without tearing the interpreter down (which the shell would wait for): everything
    is reverted and reported by now."""
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        logs.stdout_gone()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup_terminal(verbose=args.verbose, quiet=args.quiet)
    try:
        try:
            return _run(args)
        except (BlockingIOError, RuntimeError) as e:
            if (error := limit_reached(e)) is None:
                raise
            raise error from e
    except FdeError as e:
        if args.verbose:
            log.exception("%s", e)
        else:
            print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_status
