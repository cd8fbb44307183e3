"""Demo studies: chest radiographs projected from a real CT, with exact anatomy and findings.

See :mod:`anatomy_vlm.demo.builder` for the output layout and :mod:`anatomy_vlm.demo.regions` for
the region rules.
"""

from __future__ import annotations


def build_demo(*args, **kwargs):
    """See :func:`anatomy_vlm.demo.builder.build_demo` (imported lazily: it needs torch)."""
    from .builder import build_demo as _build

    return _build(*args, **kwargs)


__all__ = ["build_demo"]
