"""What the AnatomyVLM widget shows, computed from the server's answers (no Slicer, no Qt: tested in pytest)."""

from __future__ import annotations

from typing import Optional

STAGE_PROGRESS = {"starting": 5, "training": 30, "validating": 80, "done": 100, "restored": 100, "failed": 0}
"""Progress bar value per fine-tuning stage (the round reports stages, not steps)."""


def region_rows(detection: dict, findings: Optional[dict] = None, top: int = 2) -> list[tuple[str, str, str]]:
    """Rows ``(region, score, top findings)`` of the regions table, in the server's order."""
    per = {r["name"]: r.get("findings", []) for r in (findings or {}).get("regions", [])}
    rows = []
    for r in detection.get("regions", []):
        fs = ", ".join(f"{f['finding']} {f['score']:.2f}" for f in per.get(r["name"], [])[:top])
        rows.append((r["name"], f"{r['score']:.3f}", fs))
    return rows


def image_finding_rows(findings: dict) -> list[tuple[str, str, str]]:
    """Rows ``(finding, score, region carrying it)`` of the image-level table, best first."""
    return [(f["finding"], f"{f['score']:.3f}", f.get("region", "")) for f in findings.get("findings", [])]


def input_check_text(answer: dict) -> str:
    """The status line's warning about the image (the server's ``input_check``), ``""`` when the image
    is in the model's training range and its DICOM attributes raise nothing."""
    check = answer.get("input_check") or {}
    parts = []
    level = check.get("level")
    if level and level != "in range":
        ratio = check.get("ratio")
        head = level[0].upper() + level[1:] + (f" ({ratio:.1f}x the threshold)" if ratio is not None else "")
        parts.append(f"{head}: {check.get('message', '')}".rstrip(": "))
    parts.extend(check.get("notes") or [])
    return "; ".join(parts)


def grounding_emphasis(grounding: dict) -> dict[str, float]:
    """``{region: relative probability}`` of the top regions of a grounded sentence (1.0 = the most likely):
    the widget thickens and brightens those ROIs, the others fade."""
    regions = grounding.get("regions", [])
    if not regions:
        return {}
    top = max(r["probability"] for r in regions) or 1.0
    return {r["name"]: round(r["probability"] / top, 4) for r in regions}


def training_progress(stats: dict) -> tuple[int, str]:
    """``(progress bar value, status text)`` from the fine-tuning stats."""
    stage = stats.get("stage")
    if not stage:
        return 0, "No training yet."
    if stage == "failed":
        return 0, f"Fine-tuning failed: {stats.get('error', 'see the server log')}"
    if stage == "done":
        verdict = "now served" if stats.get("promoted") else "kept back"
        return 100, f"{stats.get('version')} {verdict} ({stats.get('reason', '')})"
    if stage == "restored":
        return 100, f"{stats.get('served')} restored"
    return STAGE_PROGRESS.get(stage, 10), f"{stage} {stats.get('version', '')}".strip()
