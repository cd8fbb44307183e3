"""Render the AnatomyVLM Slicer module's .ui file offscreen into a PNG (docs/slicer_module_layout.png).

    QT_QPA_PLATFORM=offscreen python scripts/render_slicer_ui.py [OUT.png]

Needs PySide6 (``pip install PySide6-Essentials`` in any Python; not a project dependency). Slicer itself
renders the same file with its own Qt; the tables are filled with example rows so the layout reads.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtCore import QFile  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QTableWidget, QTableWidgetItem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "slicer_module" / "AnatomyVLM" / "Resources" / "UI" / "AnatomyVLM.ui"
ROWS = {"regionsTable": [("right lung", "0.957", "atelectasis 0.13, consolidation 0.05"),
                         ("right upper lung zone", "0.952", "consolidation 0.01, mass 0.01"),
                         ("cardiac silhouette", "0.941", "cardiomegaly 0.22, mass 0.04")],
        "imageFindingsTable": [("pleural effusion", "0.412", "right costophrenic angle"),
                               ("cardiomegaly", "0.221", "cardiac silhouette")]}


def main(out: str) -> int:
    app = QApplication(sys.argv)
    f = QFile(str(UI))
    f.open(QFile.ReadOnly)
    w = QUiLoader().load(f)
    f.close()
    for name, rows in ROWS.items():
        t = w.findChild(QTableWidget, name)
        t.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                t.setItem(i, j, QTableWidgetItem(text))
        t.resizeColumnsToContents()
    w.resize(460, 760)
    w.show()
    app.processEvents()
    ok = w.grab().save(out)
    print(out if ok else "could not save", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "slicer_module_layout.png")))
