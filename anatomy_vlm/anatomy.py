"""The anatomy registry: the one source of truth for the 29 Chest ImaGenome regions.

Pure data, no torch and no numpy. Everything that needs to know the regions reads this module:
the number of anatomy queries in the model, label ids in masks, colours in Slicer and OHIF,
text prompts, and the tests.

Conventions:
    * ``id`` is the label value used in label images and the index+1 of the anatomy query
      (query ``i`` predicts the region with ``id == i + 1``). Id 0 is background. Ids are stable:
      never renumber, only append.
    * ``side`` is the *patient's* side: ``"right"``, ``"left"`` or ``"midline"``. On a PA (or AP)
      frontal radiograph displayed in the standard radiological convention the patient's right is
      on the image's left (small column index).
    * ``colour`` is an RGB triple in 0..255.
    * ``name`` is the Chest ImaGenome region name (lower case, as in its scene graphs);
      ``display`` is the human-readable form used in viewers.
"""

from __future__ import annotations

from dataclasses import dataclass

REGISTRY_VERSION = "cxr-29/1"
"""Changes whenever ids, names or the set of regions change; stored in checkpoint metadata."""


@dataclass(frozen=True)
class Region:
    """One anatomical region of a frontal chest radiograph.

    Attributes:
        id: Stable label id (1..29); 0 is background.
        name: Chest ImaGenome name, e.g. ``"right upper lung zone"``.
        display: Display name for viewers, e.g. ``"Right upper lung zone"``.
        side: Patient side: ``"right"``, ``"left"`` or ``"midline"``.
        colour: RGB colour, each channel 0..255.
        description: One or two sentences of anatomical knowledge, used to enrich the region's
            text embedding and shown as a tooltip.
        parent: Name of the region that contains this one (zones inside a lung), or ``None``.
    """

    id: int
    name: str
    display: str
    side: str
    colour: tuple[int, int, int]
    description: str
    parent: str | None = None

    @property
    def key(self) -> str:
        """Identifier-safe name, e.g. ``right_upper_lung_zone``."""
        return self.name.replace(" ", "_")


def _r(id_, name, side, colour, description, parent=None) -> Region:
    return Region(id_, name, name[0].upper() + name[1:], side, colour, description, parent)


# Colours: right-sided structures in warm hues, left-sided in cool hues, midline in neutrals/greens,
# so a left/right swap is visible at a glance in an overlay.
REGIONS: tuple[Region, ...] = (
    _r(1, "right lung", "right", (230, 25, 75),
       "The right lung has three lobes (upper, middle, lower) and occupies the right hemithorax, "
       "bounded by the mediastinum medially and the right hemidiaphragm below."),
    _r(2, "right upper lung zone", "right", (245, 130, 48),
       "The upper third of the right lung field, from the apex to the level of the anterior second rib; "
       "a common site of tuberculosis and apical masses.", "right lung"),
    _r(3, "right mid lung zone", "right", (255, 180, 90),
       "The middle third of the right lung field, around the hilum and the horizontal fissure; "
       "includes much of the right middle lobe.", "right lung"),
    _r(4, "right lower lung zone", "right", (200, 80, 20),
       "The lower third of the right lung field above the right hemidiaphragm; a frequent site of "
       "aspiration, consolidation and atelectasis.", "right lung"),
    _r(5, "right hilar structures", "right", (170, 110, 40),
       "The right hilum: right main and intermediate bronchus, right pulmonary artery and pulmonary "
       "veins where they enter the lung; usually slightly lower than the left hilum.", "right lung"),
    _r(6, "right apical zone", "right", (255, 215, 0),
       "The right lung apex above the clavicle, behind the first rib; Pancoast tumours and apical "
       "pneumothorax appear here.", "right lung"),
    _r(7, "right costophrenic angle", "right", (255, 100, 120),
       "The sharp lateral angle between the right hemidiaphragm and the chest wall; blunting is an "
       "early sign of pleural effusion.", "right lung"),
    _r(8, "right hemidiaphragm", "right", (180, 30, 60),
       "The dome of the right hemidiaphragm, normally higher than the left because of the liver "
       "below it."),
    _r(9, "left lung", "left", (0, 130, 200),
       "The left lung has two lobes (upper with lingula, and lower) and occupies the left hemithorax, "
       "beside the heart."),
    _r(10, "left upper lung zone", "left", (70, 170, 240),
       "The upper third of the left lung field, from the apex to the level of the anterior second rib.",
       "left lung"),
    _r(11, "left mid lung zone", "left", (100, 200, 255),
       "The middle third of the left lung field, around the left hilum and including the lingula.",
       "left lung"),
    _r(12, "left lower lung zone", "left", (0, 90, 160),
       "The lower third of the left lung field above the left hemidiaphragm, partly behind the heart.",
       "left lung"),
    _r(13, "left hilar structures", "left", (60, 60, 200),
       "The left hilum: left main bronchus, left pulmonary artery arching over it, and pulmonary "
       "veins.", "left lung"),
    _r(14, "left apical zone", "left", (145, 30, 180),
       "The left lung apex above the clavicle, behind the first rib.", "left lung"),
    _r(15, "left costophrenic angle", "left", (140, 140, 255),
       "The sharp lateral angle between the left hemidiaphragm and the chest wall; blunting suggests "
       "pleural fluid.", "left lung"),
    _r(16, "left hemidiaphragm", "left", (40, 40, 120),
       "The dome of the left hemidiaphragm, with the stomach bubble and spleen beneath it."),
    _r(17, "trachea", "midline", (60, 180, 75),
       "The air-filled trachea descends in the midline from the neck into the upper mediastinum and "
       "divides at the carina; deviation suggests mass effect or volume loss."),
    _r(18, "spine", "midline", (128, 128, 128),
       "The thoracic vertebral column in the midline behind the heart and mediastinum."),
    _r(19, "right clavicle", "right", (250, 190, 212),
       "The right clavicle crosses the upper right hemithorax from the sternum to the shoulder."),
    _r(20, "left clavicle", "left", (220, 190, 255),
       "The left clavicle crosses the upper left hemithorax from the sternum to the shoulder."),
    _r(21, "aortic arch", "midline", (128, 0, 0),
       "The aortic arch (aortic knob) projects at the upper left mediastinal border, above the left "
       "hilum; unfolding and calcification are common with age."),
    _r(22, "mediastinum", "midline", (170, 255, 195),
       "The mediastinum lies between the lungs and contains the heart, great vessels, trachea and "
       "oesophagus; widening may indicate vascular injury or a mass."),
    _r(23, "upper mediastinum", "midline", (128, 128, 0),
       "The superior mediastinum above the heart, containing the great vessels, trachea and thymus.",
       "mediastinum"),
    _r(24, "svc", "right", (255, 250, 200),
       "The superior vena cava forms the upper right mediastinal border and drains into the right "
       "atrium; central lines are placed here.", "mediastinum"),
    _r(25, "cardiac silhouette", "midline", (210, 245, 60),
       "The heart shadow: right atrium on the right border, left ventricle on the left border; a "
       "cardiothoracic ratio above one half on a PA film suggests cardiomegaly.", "mediastinum"),
    _r(26, "cavoatrial junction", "right", (0, 128, 128),
       "Where the superior vena cava joins the right atrium, the target position for central venous "
       "catheter tips.", "mediastinum"),
    _r(27, "right atrium", "right", (255, 160, 160),
       "The right atrium forms the right heart border on a frontal radiograph.", "cardiac silhouette"),
    _r(28, "carina", "midline", (0, 200, 100),
       "The carina is where the trachea divides into the main bronchi, at about the level of T4-T5; "
       "endotracheal tube tips should lie a few centimetres above it."),
    _r(29, "abdomen", "midline", (154, 99, 36),
       "The upper abdomen below the diaphragm: liver on the right, stomach and spleen on the left; "
       "free air under the diaphragm indicates perforation."),
)

NUM_REGIONS = len(REGIONS)
REGION_NAMES: tuple[str, ...] = tuple(r.name for r in REGIONS)
_BY_NAME = {r.name: r for r in REGIONS}
_BY_ID = {r.id: r for r in REGIONS}
_ALIASES = {
    "superior vena cava": "svc",
    "heart": "cardiac silhouette",
    "cardiac": "cardiac silhouette",
    "right hilum": "right hilar structures",
    "left hilum": "left hilar structures",
    "right apex": "right apical zone",
    "left apex": "left apical zone",
}


def region(name_or_id: str | int) -> Region:
    """Look a region up by id, Chest ImaGenome name, key (``right_lung``) or a common alias.

    Raises:
        KeyError: with a message listing valid names, when the region is unknown.
    """
    if isinstance(name_or_id, bool):
        raise KeyError(f"unknown region {name_or_id!r}")
    if isinstance(name_or_id, int):
        if name_or_id in _BY_ID:
            return _BY_ID[name_or_id]
        raise KeyError(f"unknown region id {name_or_id}; valid ids are 1..{NUM_REGIONS}")
    key = str(name_or_id).strip().lower().replace("_", " ")
    key = _ALIASES.get(key, key)
    if key in _BY_NAME:
        return _BY_NAME[key]
    raise KeyError(f"unknown region {name_or_id!r}; valid names: {', '.join(REGION_NAMES)}")


def label_map() -> dict[str, int]:
    """``{name: id}`` for all regions, in id order (the form MONAI Label's ``labels`` takes)."""
    return {r.name: r.id for r in REGIONS}


def mirror(name: str) -> str | None:
    """The same structure on the other side (``right lung`` -> ``left lung``), or ``None`` if midline
    or unpaired."""
    r = region(name)
    for a, b in (("right ", "left "), ("left ", "right ")):
        if r.name.startswith(a):
            other = b + r.name[len(a):]
            return other if other in _BY_NAME else None
    return None


def children(name: str) -> tuple[Region, ...]:
    """Regions whose ``parent`` is ``name``."""
    parent = region(name).name
    return tuple(r for r in REGIONS if r.parent == parent)
