"""fuse-disk-export(1): the options from the parser (argparse-manpage), the rest written here."""

from __future__ import annotations

import re

from argparse_manpage.manpage import Manpage

from docgen import full_parser
from fuse_disk_export import __version__

DESCRIPTION = r"""
.B fuse-disk-export
starts
.BR qemu-storage-daemon (1)
with a FUSE block export of each
.I IMAGE
(qcow2, vmdk, vdi, vhdx, vpc, qed, parallels, LUKS, dmg, raw... any format QEMU reads, with its
backing chain) mounted over the image's own path, or over the file given with
.BR -m .
Until it reverts, the path reads and writes as a raw disk image; then it is the image again.
It prints one line once every export is live (or, with
.BR -d ,
returns then), and reverts on SIGINT, SIGTERM or SIGHUP: the exports are unmounted, the daemon
stops and nothing is left mounted.
.PP
Images a guest could write to may be hostile: the header of an image decides which files QEMU
opens, so backing files are followed only to plain files beside it
.RB ( --backing\ safe ,
the default).
.PP
.B --doctor
tells whether exporting works on this machine and what the tool would choose there, one check a
line, each failure with its remedy; with images, what detection says of each.
"""

EXAMPLES = r"""
.TP
.B fuse-disk-export disk.qcow2 &
Export disk.qcow2 on its own path; prints one line once live.
.B kill -SIGINT %1
reverts it.
.TP
.B fuse-disk-export -dp fde.pid disk.qcow2
Return once live; fde.pid holds the serving pid.
.B kill -SIGINT $(cat fde.pid)
reverts it, and fde.pid is gone once it has.
.TP
.B fuse-disk-export -r -m disk.raw disk.vmdk
Export disk.vmdk read-only on disk.raw (made, and removed after).
.TP
.B fuse-disk-export -s -P 1 --mount-fs mnt disk.qcow2
Mount the filesystem of partition 1 on mnt, rootless; writes go to a temporary overlay.
.TP
.B fuse-disk-export --list --json
The live exports, as JSON.
.TP
.B fuse-disk-export --stop disk.qcow2
Revert the export on disk.qcow2, and wait until it is reverted.
.TP
.B fuse-disk-export --doctor disk.qcow2
Will exporting work here, and how would disk.qcow2 be exported.
"""

EXIT_STATUS = r"""
.TP
.B 0
Success; after a signal once live, a clean revert.
With
.BR --doctor :
everything a default export needs works.
.TP
.B 1
A failure: an image, a mount point, the pid file, qemu-storage-daemon, a missing requirement.
The error is one line naming the file and the reason; nothing is left mounted.
.TP
.B 2
A bad command line.
.TP
.B 128+N
Signal N (SIGINT, SIGTERM or SIGHUP) interrupted the setup; whatever was set up was rolled back.
"""

SIGNALS = r"""
.TP
.B SIGINT, SIGTERM, SIGHUP
Revert: every export is unmounted, qemu-storage-daemon stops, the pid file is removed, and the
process exits 0.
Before every export is live, the setup is rolled back instead (exit status 128+N).
"""

FILES = r"""
.TP
.I PATH
of
.BR -p :
the pid file, written once live (the serving process's pid) and removed on revert; held, so that
a second invocation with the same file is refused.
.TP
.I $XDG_RUNTIME_DIR/fuse-disk-export/
The runtime registry of live exports that
.B --list
and
.B --stop
read (one JSON file per running fuse-disk-export), and the cache of what each installed
qemu-storage-daemon can do.
.I /run/fuse-disk-export/
for root without XDG_RUNTIME_DIR;
.I $TMPDIR/fuse-disk-export-UID/
for others without it.
.TP
.I /etc/fuse.conf
.B user_allow_other
there lets a user's exports be seen by other users
.RB ( --allow-other ).
.TP
.I /sys/fs/fuse/connections/
fusectl, through which writable exports on a QEMU without the FUSE write fix are kept to one
write at a time.
"""

ENVIRONMENT = r"""
.TP
.B PATH
Where qemu-storage-daemon, qemu-nbd, fusermount3 and the
.B --mount-fs
drivers (fuse2fs, ntfs-3g, fusefat, fuseiso, squashfuse) are looked for.
.TP
.B XDG_RUNTIME_DIR, TMPDIR
Where the runtime registry is (FILES).
.TP
.B NOTIFY_SOCKET
Set by systemd for a Type=notify service: READY=1 is sent once every export is live.
"""

SEE_ALSO = r"""
.BR qemu-storage-daemon (1),
.BR qemu-nbd (8),
.BR qemu-img (1),
.BR fusermount3 (1),
.BR fuse (8)
"""

SYNOPSIS = r"""
.B fuse-disk-export
[\fIOPTIONS\fR] \fIIMAGE\fR...
.br
.B fuse-disk-export
--list [--json]
.br
.B fuse-disk-export
--stop \fIPATH\fR|\fIPID\fR...
.br
.B fuse-disk-export
--doctor [--json] [\fIIMAGE\fR...]
.br
.B fuse-disk-export
-h | --help | -V | --version
"""

SECTIONS = {
    "synopsis": SYNOPSIS,
    "description": DESCRIPTION,
    "examples": EXAMPLES,
    "exit status": EXIT_STATUS,
    "signals": SIGNALS,
    "files": FILES,
    "environment": ENVIRONMENT,
    "see also": SEE_ALSO,
}


def manpage() -> str:
    """The text of fuse-disk-export.1."""
    parser = full_parser()
    parser.epilog = None  # --help's examples: EXAMPLES here says more
    parser.description = None  # its one line is DESCRIPTION's first paragraph, in more words
    page = Manpage(
        parser,
        {
            "project_name": "fuse-disk-export",
            "version": __version__,
            "manual_title": "User Commands",
            "description": "any QEMU disk image as a raw image on its own path",
            # No date: it would change the page every day, or need one kept by hand; the
            # version says which release it describes.
            "date": " ",
        },
    )
    for heading, text in SECTIONS.items():
        page.add_section(heading, "=", _hyphens(text.strip()))
    return str(page)


def _hyphens(roff: str) -> str:
    """Every hyphen of the text as roff's minus sign: options and commands are typed as they
    read (man-pages(7)); a plain ``-`` may be rendered as a typographic hyphen."""
    return re.sub(r"(?<!\\)-", r"\-", roff)
