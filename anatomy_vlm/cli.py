"""Command line: a thin layer over the Python API (``anatomy-vlm --help``)."""

from __future__ import annotations

import argparse
import sys
import time


def _build_demo(a: argparse.Namespace) -> int:
    import torch

    from .demo import build_demo
    from .demo.sheet import contact_sheet

    torch.set_num_threads(max(1, a.threads))
    t = time.time()
    manifest = build_demo(a.out, n=a.n, seed=a.seed, size=a.size, progress=not a.quiet,
                          workers=a.workers)
    print(f"built {a.n} studies in {time.time() - t:.1f} s -> {manifest}")
    if a.contact_sheet:
        print(f"contact sheet -> {contact_sheet(a.out, a.contact_sheet)}")
    return 0


def _contact_sheet(a: argparse.Namespace) -> int:
    from .demo.sheet import contact_sheet

    print(contact_sheet(a.demo, a.out, n=a.n, ids=a.ids or None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anatomy-vlm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-demo", help="project the bundled chest CT into labelled demo studies")
    b.add_argument("--out", required=True, help="output folder (studies/ inside is the datastore)")
    b.add_argument("--n", type=int, default=200, help="number of studies (default 200)")
    b.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    b.add_argument("--size", type=int, default=512, help="long side of the images in pixels")
    b.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    b.add_argument("--threads", type=int, default=2, help="torch threads when --workers 1")
    b.add_argument("--contact-sheet", help="also write a contact sheet PNG here")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_demo)
    c = sub.add_parser("contact-sheet", help="draw demo studies with their boxes into one PNG")
    c.add_argument("--demo", required=True, help="demo folder (holds manifest.json)")
    c.add_argument("--out", required=True, help="PNG to write")
    c.add_argument("--n", type=int, default=4)
    c.add_argument("--ids", nargs="*", help="study ids to show")
    c.set_defaults(func=_contact_sheet)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"anatomy-vlm {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
