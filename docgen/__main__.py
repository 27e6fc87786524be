"""``python -m docgen [--check]``: write share/ from the parser, or say which file is stale."""

from __future__ import annotations

import sys

from docgen import ROOT, outputs


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    stale = []
    for path, make in outputs().items():
        text = make()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path}: {'out of date (python -m docgen)' if check else 'written'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
