"""Code the tests share: import it from its module here (``tests.helpers.images`` ...), never
from a test module or a conftest.

- ``units``: KiB, MiB.
- ``host``: what this machine has (``require``) and which QEMU the run tests.
- ``runner``: processes the tests start and wait on (``Runner``, behind the ``fde`` fixture;
  ``Processes``, behind ``hand``), ``wait_for``, ``pid_gone``.
- ``images``: making and inspecting images with qemu-img and qemu-io; ``sha256``.
- ``checks``: the end state a test asserts (nothing mounted, no daemon left, one-line errors).
- ``completion``: the bash completion script, run as bash would.
- ``records``: runtime-registry records for the --list/--stop tests.
"""
