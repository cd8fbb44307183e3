"""Command line: a thin layer over the Python API (``anatomy-vlm --help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


DEFAULT_CHECKPOINT_REL = "apps/anatomy_vlm/model/anatomy_vlm.pt"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT_REL
"""The served checkpoint of the repository checkout (``predict``'s default)."""


def _build_demo(a: argparse.Namespace) -> int:
    import torch

    from .demo import build_demo
    from .demo.sheet import contact_sheet

    torch.set_num_threads(max(1, a.threads))
    t = time.time()
    manifest = build_demo(a.out, n=a.n, seed=a.seed, size=a.size, progress=not a.quiet,
                          workers=a.workers, split=a.split, shifted=a.shift)
    print(f"built {a.n} studies in {time.time() - t:.1f} s -> {manifest}")
    if a.contact_sheet:
        print(f"contact sheet -> {contact_sheet(a.out, a.contact_sheet)}")
    return 0


def _contact_sheet(a: argparse.Namespace) -> int:
    from .demo.sheet import contact_sheet

    print(contact_sheet(a.demo, a.out, n=a.n, ids=a.ids or None))
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    import json

    import torch

    from .evaluate import format_report, run_evaluation
    from .io import write_json_atomic

    torch.set_num_threads(max(1, a.threads))
    result = run_evaluation(a.checkpoint, a.demo, a.task, split=a.split, overlays_dir=a.overlays,
                            limit=a.limit, progress=not a.quiet and not a.json,
                            mask_boxes=a.mask_boxes)
    if a.output:
        write_json_atomic(result, a.output)
    print(json.dumps(result, indent=2) if a.json else format_report(result))
    return 0


def _train(a: argparse.Namespace) -> int:
    import json

    from .train import load_config, train

    overrides: dict = {}
    if a.epochs is not None:
        overrides.setdefault("train", {})["epochs"] = a.epochs
    if a.checkpoint:
        overrides.setdefault("output", {})["checkpoint"] = a.checkpoint
    cfg = load_config(a.config, overrides)
    summary = train(cfg, resume=a.resume, progress=not a.quiet, command=" ".join(["anatomy-vlm", "train"] + a.argv))
    print(json.dumps(summary, indent=1))
    return 0


def _predict(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from .checkpoint import CheckpointFormatError
    from .io import write_region_masks
    from .predict import Predictor

    torch.set_num_threads(max(1, a.threads))
    ckpt = Path(a.checkpoint) if a.checkpoint else DEFAULT_CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt} (train one with `anatomy-vlm train` or pass --checkpoint)")
    try:
        predictor = Predictor.from_checkpoint(ckpt, cache_dir=None if a.no_cache else a.cache_dir)
    except CheckpointFormatError as e:
        raise ValueError(str(e)) from e
    masks = bool(a.masks or a.overlay or a.mask_boxes)
    prompts = None
    if a.prompt:
        from .findings import parse_prompts

        prompts = parse_prompts(a.prompt)
    pred = predictor.predict(a.image, with_masks=masks, regions=a.regions or None, align=bool(prompts))
    if a.overlay:
        import numpy as np

        from .evaluate import draw_overlay
        from .io import read_image

        if len(pred.boxes) != 29:
            raise ValueError("--overlay draws all 29 regions: do not combine it with --regions")
        img = draw_overlay(read_image(a.image).pixels, pred.boxes, np.zeros_like(pred.boxes),
                           np.zeros(len(pred.boxes), bool), scores=pred.scores, pred_masks=pred.masks,
                           title=f"{Path(a.image).name}: predicted boxes and masks ({ckpt.name})")
        img.save(a.overlay)
    if a.masks:
        from .io import read_image

        rg = read_image(a.image)
        write_region_masks(pred.masks, a.masks, rg.spacing if rg.spacing_known else None)
    if prompts:  # per region every prompt's probability; for the image, the largest over the regions
        from .findings import region_findings

        doc = region_findings(pred, predictor.language(), prompts, top_k=None)
    else:
        doc = pred.to_json()
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        h, w = pred.image_shape
        print(f"{a.image}: {w}x{h} px, {len(doc['regions'])} regions ({pred.timing['total']:.2f} s)")
        print(f"{'id':>3}  {'region':<26} {'x0':>8} {'y0':>8} {'x1':>8} {'y1':>8} {'score':>6}")
        for r in doc["regions"]:
            print(f"{r['id']:>3}  {r['name']:<26} " + " ".join(f"{v:8.1f}" for v in r["box"]) + f" {r['score']:6.3f}"
                  + "".join(f"  {f['finding']}={f['score']:.2f}" for f in r.get("findings", [])))
        for f in doc.get("findings", []):
            print(f"image: {f['finding']}: {f['score']:.3f} (at the {f['region']})")
    if a.masks:
        print(f"masks ({len(pred.indices)} regions, NIfTI x=col, y=row, k=region) -> {a.masks}", file=sys.stderr)
    return 0


def _parse_reports(a: argparse.Namespace) -> int:
    import json

    from . import report_parser as rp

    if a.text:
        doc = [{"sentence": s, "mentions": [{"finding": m.finding, "negated": m.negated, "regions": list(m.regions)}
                                             for m in ms]} for s, ms in rp.parse_report(a.text)]
        print(json.dumps(doc, indent=1))
        return 0
    res: dict = {}
    if a.iu:
        sentences = rp.iu_sentences()
        res["iu_corpus"] = rp.corpus_summary(sentences.values())
        if a.labels:
            res["iu_hand_labels"] = rp.evaluate_labels(a.labels, sentences)
    if a.demo:
        res["demo"] = rp.evaluate_demo(a.demo)
    if not res:
        raise ValueError("give --text, --iu (with --labels to measure) or --demo")
    print(json.dumps(res, indent=1))
    return 0


def _calibrate_boxes(a: argparse.Namespace) -> int:
    import json

    import torch

    from .box_calibration import calibrate_checkpoint

    torch.set_num_threads(max(1, a.threads))
    cal = calibrate_checkpoint(a.checkpoint, a.demo, split=a.split, cache_dir=a.cache_dir, progress=not a.quiet)
    print(json.dumps({k: v for k, v in cal.items() if k != "offsets"}, indent=1))
    return 0


def _fit_familiarity(a: argparse.Namespace) -> int:
    import json

    import torch

    from .familiarity import familiarity_for_checkpoint

    torch.set_num_threads(max(1, a.threads))
    ref = familiarity_for_checkpoint(a.checkpoint, a.demo, fit_split=a.fit_split, split=a.split,
                                     cache_dir=a.cache_dir, progress=not a.quiet)
    print(json.dumps(ref, indent=1))
    return 0


def _versions(a: argparse.Namespace) -> int:
    import json

    from .finetune import ModelVersions

    v = ModelVersions(a.checkpoint)
    if a.restore:
        v.restore(a.restore)
        print(f"serving {a.restore} at {a.checkpoint}", file=sys.stderr)
    idx = v.index()
    if a.json:
        print(json.dumps(idx, indent=1))
        return 0
    print(f"{'version':<8} {'served':<6} {'created':<25} {'parent':<7} {'demo val mAP':>12} {'held-out IoU':>12}  note")
    for e in idx["versions"]:
        m = e.get("metrics") or {}
        f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{e['version']:<8} {'*' if e['version'] == idx['served'] else '':<6} {str(e.get('created')):<25} "
              f"{str(e.get('parent') or ''):<7} {f(m.get('demo_val_map')):>12} {f(m.get('heldout_iou')):>12}  "
              f"{e.get('note', '')}")
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
    b.add_argument("--split", choices=["train", "val", "test"],
                   help="draw every study as this split (test: a shifted domain); default the usual mix")
    b.add_argument("--shift", action="append", metavar="NAME",
                   help="test studies draw only this parameter or group (pose, magnification, framing, anatomy, "
                        "exposure, grey mapping) from outside the training ranges; repeatable; default all")
    b.add_argument("--contact-sheet", help="also write a contact sheet PNG here")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_demo)
    t = sub.add_parser("train", help="train the anatomy decoder and mask head (torchrun-compatible)")
    t.add_argument("--config", help="JSON/YAML run config (see anatomy_vlm.train); e.g. configs/demo.json")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--checkpoint", help="override output.checkpoint")
    t.add_argument("--resume", action="store_true", help="continue from output.run_dir/last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    c = sub.add_parser("contact-sheet", help="draw demo studies with their boxes into one PNG")
    c.add_argument("--demo", required=True, help="demo folder (holds manifest.json)")
    c.add_argument("--out", required=True, help="PNG to write")
    c.add_argument("--n", type=int, default=4)
    c.add_argument("--ids", nargs="*", help="study ids to show")
    c.set_defaults(func=_contact_sheet)
    e = sub.add_parser("evaluate", help="COCO-style box AP / mask Dice of a checkpoint on a demo split")
    e.add_argument("--checkpoint", default="apps/anatomy_vlm/model/anatomy_vlm.pt",
                   help="checkpoint file (default apps/anatomy_vlm/model/anatomy_vlm.pt)")
    e.add_argument("--demo", default="data/demo", help="demo folder holding manifest.json (default data/demo)")
    e.add_argument("--task", choices=("detection", "segmentation", "findings"), default="detection",
                   help="findings: zero-shot region/image finding AUCs and sentence grounding (language stage)")
    e.add_argument("--split", choices=("train", "val", "test", "all"), default="test")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.add_argument("--output", help="also write the JSON result to this file")
    e.add_argument("--overlays", help="write one overlay PNG per study into this folder")
    e.add_argument("--limit", type=int, help="evaluate only the first N studies of the split")
    e.add_argument("--mask-boxes", action="store_true",
                   help="detection: score the masks' bounding boxes (the server's refine_boxes option) "
                        "instead of the decoder's boxes (its default)")
    e.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_evaluate)
    pr = sub.add_parser("predict", help="boxes (and masks) of the 29 regions in one image")
    pr.add_argument("image", help="DICOM, PNG, JPEG or NIfTI image")
    pr.add_argument("--checkpoint", help=f"checkpoint file (default {DEFAULT_CHECKPOINT_REL})")
    pr.add_argument("--json", action="store_true", help="print JSON: {image, image_shape, regions: [{name, id, box, score}]}")
    pr.add_argument("--masks", metavar="OUT.nii.gz", help="also write the region masks (x=col, y=row, k=region)")
    pr.add_argument("--regions", help="comma-separated region names (default all 29)")
    pr.add_argument("--overlay", metavar="OUT.png", help="also draw the predicted boxes and masks into a PNG")
    pr.add_argument("--mask-boxes", action="store_true",
                    help="report the masks' bounding boxes instead of the decoder's boxes (also implied by "
                         "--masks/--overlay)")
    pr.add_argument("--prompt", action="append", metavar="TEXT",
                    help="a finding text to score per region and for the image (zero-shot; repeat for more); "
                         "adds \"findings\" to the JSON")
    pr.add_argument("--cache-dir", help="embedding cache folder (default: memory only)")
    pr.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    pr.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    pr.set_defaults(func=_predict)
    cb = sub.add_parser("calibrate-boxes", help="fit the per-region box offsets to the reference boxes on a "
                                                "demo split (val) and store them in the checkpoint")
    cb.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=f"default {DEFAULT_CHECKPOINT_REL}")
    cb.add_argument("--demo", default="data/demo", help="demo folder holding manifest.json (default data/demo)")
    cb.add_argument("--split", choices=("val", "train"), default="val")
    cb.add_argument("--cache-dir", default="data/cache/embeddings", help="embedding cache folder")
    cb.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    cb.add_argument("--quiet", action="store_true", help="no progress bar")
    cb.set_defaults(func=_calibrate_boxes)
    ff = sub.add_parser("fit-familiarity", help="fit the training images' embedding statistics that grade how "
                                                "familiar each image looks (input_check) and store them in "
                                                "the checkpoint")
    ff.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=f"default {DEFAULT_CHECKPOINT_REL}")
    ff.add_argument("--demo", default="data/demo", help="demo folder holding manifest.json (default data/demo)")
    ff.add_argument("--fit-split", choices=("train", "val"), default="train",
                    help="the images whose mean and covariance are the reference (default train)")
    ff.add_argument("--split", choices=("val", "train"), default="val",
                    help="held-out images whose largest distance is the threshold (default val)")
    ff.add_argument("--cache-dir", default="data/cache/embeddings", help="embedding cache folder")
    ff.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ff.add_argument("--quiet", action="store_true", help="no progress bar")
    ff.set_defaults(func=_fit_familiarity)
    v = sub.add_parser("versions", help="list the served checkpoint's fine-tuned versions, or restore one")
    v.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="the served checkpoint (versions live in versions/ next to it)")
    v.add_argument("--restore", metavar="VERSION", help="serve this version again (e.g. v0001)")
    v.add_argument("--json", action="store_true", help="print the version index as JSON")
    v.set_defaults(func=_versions)
    rp = sub.add_parser("parse-reports", help="report sentences -> (regions, finding, negated); measure the parser")
    rp.add_argument("--text", help="parse this report text and print the mentions as JSON")
    rp.add_argument("--iu", action="store_true", help="run over the IU X-ray reports bundled in torchxrayvision")
    rp.add_argument("--labels", help="hand labels to measure against (docs/report_parser/iu_labels.json)")
    rp.add_argument("--demo", help="demo folder: measure against the builder's structured report sentences")
    rp.set_defaults(func=_parse_reports)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    a.argv = argv[1:]
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"anatomy-vlm {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
