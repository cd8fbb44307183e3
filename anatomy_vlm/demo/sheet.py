"""Contact sheet: a few demo studies with their region boxes, one PNG to see what the data is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..anatomy import REGIONS

#: Regions drawn on the left panel of each study (boxes); the right panel shows all masks.
MAIN = ("right lung", "left lung", "trachea", "carina", "cardiac silhouette", "aortic arch",
        "right clavicle", "left clavicle", "right costophrenic angle", "left costophrenic angle",
        "right hilar structures", "left hilar structures", "spine", "svc")


def contact_sheet(demo_dir: str | Path, out_png: str | Path, n: int = 4, tile: int = 384,
                  ids: list[str] | None = None) -> Path:
    """Draw ``n`` studies (first of each split, then in order) as rows of two panels: the
    radiograph with main region boxes and names, and the same radiograph with all 29 masks
    outlined in registry colours. Text shows id, split, findings and the report."""
    from ..io import read_image, read_region_masks

    demo_dir = Path(demo_dir)
    man = json.loads((demo_dir / "manifest.json").read_text())
    studies = man["studies"]
    if ids:
        chosen = [s for s in studies if s["id"] in ids]
    else:
        chosen, seen = [], set()
        for s in studies:
            if s["split"] not in seen:
                chosen.append(s)
                seen.add(s["split"])
        for s in studies:
            if len(chosen) >= n:
                break
            if s not in chosen and s["image_findings"]:
                chosen.append(s)
    chosen = chosen[:n]
    font = ImageFont.load_default()
    text_h = 54
    sheet = Image.new("RGB", (tile * 2, (tile + text_h) * len(chosen)), (20, 20, 20))
    for row, s in enumerate(chosen):
        img = read_image(demo_dir / s["image"]).to_uint8()
        masks = read_region_masks(demo_dir / s["masks"])
        boxes = json.loads((demo_dir / s["boxes"]).read_text())["regions"]
        H, W = img.shape
        k = tile / max(H, W)
        base = Image.fromarray(img).convert("RGB").resize((int(W * k), int(H * k)), Image.BILINEAR)
        left = base.copy()
        d = ImageDraw.Draw(left)
        for b in boxes:
            if b["name"] in MAIN:
                colour = next(r.colour for r in REGIONS if r.name == b["name"])
                x0, y0, x1, y1 = (v * k for v in b["box"])
                d.rectangle([x0, y0, x1, y1], outline=colour, width=2)
                d.text((x0 + 3, y0 + 2), b["name"], fill=colour, font=font)
        right = np.asarray(base).astype(np.float32)
        from scipy import ndimage

        for r in REGIONS:
            m = np.asarray(Image.fromarray(masks[r.id - 1].astype(np.uint8) * 255).resize(
                base.size, Image.NEAREST)) > 0
            edge = m & ~ndimage.binary_erosion(m)
            right[edge] = r.colour
        y = row * (tile + text_h)
        sheet.paste(left, (0, y))
        sheet.paste(Image.fromarray(right.astype(np.uint8)), (tile, y))
        d = ImageDraw.Draw(sheet)
        side = "patient's R = image left (PA)"
        d.text((4, y + tile + 2), f"{s['id']}  split={s['split']}  {W}x{H}px  "
               f"{s['pixel_spacing_mm'][0]:.2f} mm/px  {side}", fill=(255, 255, 255), font=font)
        d.text((4, y + tile + 16), "findings: " + (", ".join(
            f"{le['name']} ({', '.join(le['regions']) or '-'})" for le in s["lesions"]) or "none")[:120],
            fill=(255, 220, 120), font=font)
        d.text((4, y + tile + 30), ("report: " + s["report"])[:125], fill=(180, 220, 255), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
