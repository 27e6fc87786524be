"""The format parsers behind `fuse_disk_export.detect`, one module per format.

`signatures` tells a format from the first bytes (or the last sector) of a file and names its
parser, a function ``parse...(src, head) -> ImageInfo`` of one of the other modules; `detect`
imports that module the first time it meets the format, so that start-up loads no parser.  What
the parsers share is in `common`: `ImageInfo`, and the bounded `Source` they read through, which
also words the errors they have in common.  Everything here is internal: the public names are
`detect`'s.
"""
