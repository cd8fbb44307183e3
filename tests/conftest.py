"""Shared fixtures: a small demo studies folder, built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "anatomy_vlm"


@dataclass(frozen=True)
class DemoStudies:
    """A demo data folder as ``anatomy-vlm build-demo`` writes it.

    Attributes:
        root: The output folder (holds ``manifest.json``).
        studies: ``root/studies``: images, ``labels/final/<id>.nii.gz``, ``labels/boxes/<id>.boxes.json``.
    """

    root: Path
    studies: Path

    def ids(self, ext: str) -> list[str]:
        """Image ids in the studies folder whose file ends with ``ext`` (e.g. ``".dcm"``)."""
        return sorted(p.name[: -len(ext)] for p in self.studies.glob(f"*{ext}") if p.is_file())


@pytest.fixture(scope="session")
def demo_studies(tmp_path_factory) -> DemoStudies:
    """Six small demo studies (128 px), written once per session into a temp folder."""
    root = tmp_path_factory.mktemp("demo")
    from anatomy_vlm.demo import build_demo

    build_demo(root, n=6, seed=0, size=128, progress=False)
    return DemoStudies(root=root, studies=root / "studies")


@pytest.fixture(scope="module")
def two_torch_threads():
    """Two torch threads for a test module (the CI machine's cores), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
