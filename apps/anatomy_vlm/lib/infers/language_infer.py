"""The language-stage tasks: ``region_findings`` and ``text_grounding`` (thin, over ``anatomy_vlm.findings``).

``region_findings`` (InferType CLASSIFICATION, JSON only): the detection JSON of ``anatomy_detection``
(``regions`` with boxes and scores) where every region also lists its top findings, plus the image-level
``findings`` (best first, each with the region that carries it). Parameters: ``prompts`` (the user's own
finding texts, a list or one text with one prompt per line; default the knowledge base's seven
findings), ``top_k`` (findings per region, 0 = all), ``regions``.

``text_grounding`` (InferType SEGMENTATION, so the stock Slicer panel lists it and shows its
``sentence`` option in the options table): a sentence in; the JSON lists the ``top_k`` regions it
most likely refers to (box, detection score, grounding probability) and the probability of every
region; the label file is, by ``label_format``, a heatmap (``heatmap.nii.gz``, default: uint8, 255 =
the most likely region, each pixel the largest relative probability of the regions covering it) or the
top regions' masks as named, coloured segments (``seg.nrrd``).

Bad requests get 4xx JSON errors: a missing, empty, over-long (> 1,000 characters) or non-text sentence
or prompt, too many prompts, a bad ``top_k``: 400; a checkpoint without a language stage: 501.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Tuple, Union

from .anatomy_infer import AnatomyInfer, label_format
from .errors import InferRequestError, PredictorMissingError

GROUNDING_FORMATS = ("heatmap.nii.gz", "seg.nrrd")


def _int_param(req: Dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = req.get(key, default)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else default
    try:
        n = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise InferRequestError(f"{key} must be an integer from {lo} to {hi}, got {value!r}", 400)
    return n


class LanguageInfer(AnatomyInfer):
    """Shared part: the predictor must carry a language stage; the prediction runs with ``align``."""

    def language(self, predictor):
        """The predictor's zero-shot scorer; 501 when the checkpoint has no (usable) language stage."""
        try:
            return predictor.language()
        except (ValueError, FileNotFoundError) as e:
            raise PredictorMissingError(f"{self.name}: {e} (checkpoint {self.checkpoint}; e.g. "
                                        "`anatomy-vlm train --config configs/demo_align.json`)") from e


class RegionFindingsInfer(LanguageInfer):
    """``region_findings``: zero-shot findings per region and for the image (JSON)."""

    def __call__(self, request, callbacks=None) -> Tuple[Union[str, None], Dict]:
        from anatomy_vlm.findings import parse_prompts, region_findings

        predictor = self.predictor()
        req = self.request(request)
        image = self.image_path(req)
        indices = self.region_indices(req)
        try:
            prompts = parse_prompts(req.get("prompts"))
        except ValueError as e:
            raise InferRequestError(str(e), 400) from e
        top_k = _int_param(req, "top_k", 3, 0, 64)
        scorer = self.language(predictor)
        pred = self.run_predict(predictor, image, regions=[i + 1 for i in indices], align=True)
        result = region_findings(pred, scorer, prompts or None, top_k=top_k)
        result["input_check"] = pred.input_check
        result["latencies"] = pred.timing
        result["format"] = "json"
        return None, result


class TextGroundingInfer(LanguageInfer):
    """``text_grounding``: the regions a sentence refers to, with a heatmap or segments as the label."""

    def __call__(self, request, callbacks=None) -> Tuple[Union[str, None], Dict]:
        from anatomy_vlm.findings import ground_sentence, grounding_heatmap
        from anatomy_vlm.predict import image_geometry, write_image_map, write_seg_nrrd
        from anatomy_vlm.text import check_prompt

        predictor = self.predictor()
        req = self.request(request)
        image = self.image_path(req)
        sentence = req.get("sentence")
        if isinstance(sentence, (list, tuple)) and len(sentence) == 1:
            sentence = sentence[0]
        if sentence is None or (isinstance(sentence, str) and not sentence.strip()):
            raise InferRequestError("text_grounding needs a sentence (parameter 'sentence'), e.g. "
                                    "'opacity at the right lung base'", 400)
        try:
            sentence = check_prompt(sentence)
        except ValueError as e:
            raise InferRequestError(f"sentence: {e}", 400) from e
        top_k = _int_param(req, "top_k", 3, 1, 29)
        fmt = label_format(req, GROUNDING_FORMATS)
        scorer = self.language(predictor)
        pred = self.run_predict(predictor, image, with_masks=True, align=True)
        result, probs = ground_sentence(pred, scorer, sentence, top_k=top_k)
        result["input_check"] = pred.input_check
        geometry = image_geometry(image, pred.image_shape)
        fd, out = tempfile.mkstemp(suffix="." + fmt, prefix="text_grounding_")
        os.close(fd)
        if fmt == "seg.nrrd":
            top = pred.subset([r["id"] for r in result["regions"]])
            _, result["segments"] = write_seg_nrrd(top, geometry, out)
            result["label_names"] = {r["name"]: r["id"] for r in result["regions"]}
        else:
            write_image_map(grounding_heatmap(pred, probs), geometry, out)
            result["label_names"] = {}
        result["latencies"] = pred.timing
        result["format"] = fmt
        return out, result
