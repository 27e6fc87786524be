"""The command line: argv in, messages and an exit status out.  No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
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
    from fuse_disk_export.engine.graph import Tuning
    from fuse_disk_export.export import ExportRequest, serve
    from fuse_disk_export.images import ImageOptions, resolve_all

    if not args.images:
        raise UsageError("no image given (see --help)")
    options = ImageOptions(format=args.format, read_only=args.read_only, backing=args.backing)
    request = ExportRequest(
        images=resolve_all(args.images, options),
        tuning=Tuning(allow_other=args.allow_other),
        pid_file=os.path.abspath(args.pid_file) if args.pid_file else None,
        quiet=args.quiet,
    )
    if not args.daemonize:
        return serve(request)

    from fuse_disk_export.daemonize import Reporter, run_detached

    def work(reporter: Reporter) -> int:
        try:
            return serve(request, reporter)
        except FdeError as e:
            log.error("%s", e)
            return e.exit_status

    return run_detached(work)


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
