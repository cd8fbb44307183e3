"""The anatomy registry: pure data, the one source of truth for the 29 regions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from anatomy_vlm import anatomy
from anatomy_vlm.anatomy import NUM_REGIONS, REGION_NAMES, REGIONS, children, label_map, mirror, region

SIDES = {"right", "left", "midline"}


def test_29_regions_with_ids_1_to_29_in_order():
    assert NUM_REGIONS == len(REGIONS) == 29
    assert [r.id for r in REGIONS] == list(range(1, 30))


def test_names_unique_lower_case_and_match_region_names():
    names = [r.name for r in REGIONS]
    assert len(set(names)) == 29
    assert tuple(names) == REGION_NAMES
    assert all(n == n.strip().lower() and n for n in names)
    assert len({r.key for r in REGIONS}) == 29
    assert all(r.key.isidentifier() for r in REGIONS)


def test_chest_imagenome_regions_present():
    for name in ("right lung", "left lung", "trachea", "carina", "cardiac silhouette", "svc",
                 "cavoatrial junction", "aortic arch", "abdomen", "right costophrenic angle"):
        assert name in REGION_NAMES


def test_display_and_description():
    for r in REGIONS:
        assert r.display.lower() == r.name and r.display[0].isupper()
        assert len(r.description) > 20


def test_sides_consistent_with_names():
    for r in REGIONS:
        assert r.side in SIDES, r
        if r.name.startswith("right "):
            assert r.side == "right", r.name
        elif r.name.startswith("left "):
            assert r.side == "left", r.name
        if r.side == "midline":
            assert "right" not in r.name and "left" not in r.name, r.name


def test_every_parent_exists_and_hierarchy_is_acyclic():
    for r in REGIONS:
        if r.parent is None:
            continue
        parent = region(r.parent)
        assert parent.name == r.parent and parent.name != r.name
        if parent.side != "midline":  # a zone of the right lung is on the right
            assert r.side == parent.side, (r.name, parent.name)
        seen = {r.name}
        node = parent
        while node.parent is not None:
            assert node.name not in seen, f"cycle through {node.name}"
            seen.add(node.name)
            node = region(node.parent)
    assert {c.name for c in children("right lung")} >= {
        "right upper lung zone", "right mid lung zone", "right lower lung zone"}
    assert children("trachea") == ()


def test_mirror_pairs():
    right = [r for r in REGIONS if r.name.startswith("right ")]
    paired = {r.name: mirror(r.name) for r in right if mirror(r.name)}
    assert set(paired) == {r.name for r in right} - {"right atrium"}  # no left atrium region
    assert len(paired) == 9
    for name, other in paired.items():
        assert other == "left " + name[len("right "):]
        assert mirror(other) == name
        a, b = region(name), region(other)
        assert b.side == "left" and a.colour != b.colour
        assert (a.parent is None) == (b.parent is None)
        if a.parent:
            assert mirror(a.parent) == b.parent
    for r in REGIONS:
        if r.side == "midline":
            assert mirror(r.name) is None


def test_colours_valid_and_unique():
    for r in REGIONS:
        assert isinstance(r.colour, tuple) and len(r.colour) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in r.colour), r
        assert r.colour != (0, 0, 0), "black is the background"
    assert len({r.colour for r in REGIONS}) == 29


def test_label_map_is_names_to_ids_in_id_order():
    lm = label_map()
    assert list(lm) == list(REGION_NAMES)
    assert list(lm.values()) == list(range(1, 30))
    assert 0 not in lm.values()


@pytest.mark.parametrize("key", [1, "right lung", "RIGHT_LUNG", "  Right Lung "])
def test_lookup_by_id_name_and_key(key):
    assert region(key).name == "right lung"


@pytest.mark.parametrize("alias,name", [("heart", "cardiac silhouette"), ("superior vena cava", "svc"),
                                        ("left hilum", "left hilar structures")])
def test_lookup_by_alias(alias, name):
    assert region(alias).name == name


@pytest.mark.parametrize("bad,fragment", [
    (0, "valid ids are 1..29"), (30, "valid ids are 1..29"), (-1, "valid ids are 1..29"),
    ("spleen", "valid names"), ("", "valid names"), (True, "unknown region"),
])
def test_unknown_region_raises_key_error_with_message(bad, fragment):
    with pytest.raises(KeyError) as excinfo:
        region(bad)
    assert fragment in str(excinfo.value)


def test_mirror_and_children_of_unknown_raise():
    with pytest.raises(KeyError):
        mirror("spleen")
    with pytest.raises(KeyError):
        children("spleen")


def test_registry_version_and_frozen():
    assert isinstance(anatomy.REGISTRY_VERSION, str) and anatomy.REGISTRY_VERSION
    with pytest.raises(AttributeError):
        REGIONS[0].id = 5  # type: ignore[misc]


def test_registry_and_knowledge_import_no_torch_numpy_or_monailabel():
    code = ("import sys, anatomy_vlm.anatomy, anatomy_vlm.knowledge; "
            "bad = [m for m in ('torch', 'numpy', 'monailabel', 'monai') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
