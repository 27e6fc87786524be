"""The command line: argv in, messages and an exit status out.  No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fuse_disk_export import __version__
from fuse_disk_export.errors import FdeError, UsageError

PROG = "fuse-disk-export"

EXAMPLES = """\
examples:
  fuse-disk-export foo.qcow2 &             # prints one line once live; kill -SIGINT %1 reverts
  fuse-disk-export -dp fde.pid foo.qcow2   # returns once live; fde.pid holds the daemon's pid
  parted foo.qcow2 print                   # foo.qcow2 now reads as a raw disk
  kill -SIGINT $(cat fde.pid)              # reverted: foo.qcow2 is a qcow2 again, fde.pid gone
  fuse-disk-export -r a.qcow2 b.vmdk c.vdi # several images, one qemu-storage-daemon, read-only

Images a guest could write to may be hostile: see the README's security note.
"""

log = logging.getLogger("fuse_disk_export")

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Make disk images in any format QEMU reads appear as raw images on their own "
        "paths, through qemu-storage-daemon FUSE exports; revert on SIGINT, SIGTERM or SIGHUP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image file(s) to export")
    p.add_argument(
        "-d",
        "--daemonize",
        action="store_true",
        help="run in the background; return only once every export is live",
    )
    p.add_argument(
        "-p",
        "--pid-file",
        metavar="PATH",
        help="write the serving process's pid here once live; removed on revert",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument(
        "-f",
        "--format",
        metavar="FMT",
        help="image format for every image (skips detection), e.g. qcow2, raw",
    )
    p.add_argument(
        "--backing",
        choices=("safe", "none", "any"),
        default="safe",
        help="backing files: safe (default) follows plain paths to regular files only; "
        "none exports the top image alone; any lets QEMU follow whatever the image "
        "names (unsafe for untrusted images)",
    )
    p.add_argument(
        "--allow-other",
        choices=("auto", "on", "off"),
        default="auto",
        help="let other users access the export (default auto: try, fall back)",
    )
    p.add_argument(
        "-m",
        "--mountpoint",
        metavar="FILE",
        help="export on FILE instead of the image's own path (created if missing, "
        "removed on revert if created)",
    )
    p.add_argument(
        "--mountpoint-dir",
        metavar="DIR",
        help="with several images: export each on DIR/<image file name>",
    )
    p.add_argument(
        "-P",
        "--partition",
        type=int,
        metavar="N",
        help="export only partition N (MBR primary/logical or GPT) of the virtual disk",
    )
    p.add_argument(
        "--list-partitions",
        action="store_true",
        help="print the partition table of each IMAGE and exit (exports nothing)",
    )
    p.add_argument(
        "--nbd-socket",
        metavar="PATH",
        help="also serve every export over NBD on this Unix socket (export name: the "
        "image's file name; qemu:allocation-depth on); the FUSE side is then read-only",
    )
    p.add_argument(
        "-s",
        "--snapshot",
        action="store_true",
        help="writes go to a temporary overlay, deleted on revert; the image is never modified",
    )
    p.add_argument(
        "-l",
        "--load-snapshot",
        metavar="NAME_OR_ID",
        help="export an internal snapshot of a qcow2 image, read-only",
    )
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="LUKS passphrase (first line of FILE); asked on the terminal if missing",
    )
    p.add_argument(
        "--discard",
        choices=("ignore", "unmap"),
        default="unmap",
        help="what discard/TRIM through the export does (default unmap: frees space)",
    )
    p.add_argument(
        "--detect-zeroes",
        choices=("off", "on", "unmap"),
        default="off",
        help="detect writes of zeroes and write them efficiently (default off)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="writeback",
        help="host cache mode, as in qemu-nbd (default writeback)",
    )
    p.add_argument(
        "--aio",
        choices=("threads", "native", "io_uring"),
        help="AIO backend for the image files (native needs --cache none/directsync)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="with -d: log here (default: syslog, if /dev/log exists)",
    )
    p.add_argument("--list", action="store_true", help="list live exports and exit")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.add_argument(
        "--stop",
        nargs="+",
        metavar="PATH|PID",
        help="revert the exports serving PATH, or run by PID; wait until done",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the block graph, QMP traffic and tracebacks",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{PROG}: {text}" if record.levelno >= logging.WARNING else text


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if args.verbose:
        root.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    else:
        root.setLevel(logging.ERROR if args.quiet else logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    if args.list or args.stop:
        return _manage(args)
    if args.json:
        raise UsageError("--json goes with --list")
    if args.log_file and not args.daemonize:
        raise UsageError("--log-file goes with -d (in the foreground, messages go to stderr)")

    from fuse_disk_export.export import serve
    from fuse_disk_export.request import build_request, list_partitions

    if not args.images:
        raise UsageError("no image given (see --help)")
    if args.list_partitions:
        return list_partitions(args)
    request = build_request(args)
    if not args.daemonize:
        return serve(request)

    from fuse_disk_export import logs
    from fuse_disk_export.daemonize import Reporter, run_detached

    log_file = logs.open_log_file(args.log_file) if args.log_file else None

    def work(reporter: Reporter) -> int:
        logs.setup_daemon(log_file, verbose=args.verbose)
        try:
            return serve(request, reporter)
        except FdeError as e:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return _run(args)
    except FdeError as e:
        if args.verbose:
            log.exception("%s", e)
        else:
            print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
