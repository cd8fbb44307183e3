"""``region_uncertainty``: hand out the unlabelled image the model is least sure about.

Scores come from :mod:`anatomy_vlm.uncertainty` (disagreement between the decoder's, the refined and the
mask boxes, plus presence entropy), cached per model version and image, so only images not seen by the
current model cost a forward pass (their embeddings usually come from the cache). At most
``max_new_per_call`` new images are scored per request, in id order, so a large datastore never makes
the annotator wait long; the rest are scored on later calls. Without a checkpoint it falls back to the
first unlabelled image (and says so in the answer).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class RegionUncertainty(Strategy):
    """See the module docstring.

    Args:
        get_predictor: Returns the loaded ``Predictor`` (or ``None`` when there is no checkpoint).
        cache: An ``anatomy_vlm.uncertainty.UncertaintyCache``.
        max_new_per_call: New images scored per request at most.
    """

    def __init__(self, get_predictor: Callable[[], Any], cache: Any, max_new_per_call: int = 8):
        super().__init__("Unlabelled image with the highest region uncertainty (box/mask disagreement, "
                         "presence entropy)")
        self.get_predictor, self.cache, self.max_new = get_predictor, cache, int(max_new_per_call)

    def __call__(self, request, datastore: Datastore) -> Optional[dict]:
        from anatomy_vlm.uncertainty import model_version

        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        predictor = self.get_predictor()
        if predictor is None:
            logger.info("region_uncertainty: no checkpoint yet; handing out the first unlabelled image")
            return {"id": images[0], "fallback": "no checkpoint: first image"}
        version = model_version(predictor)
        scored: dict[str, float] = {}
        new = 0
        for image_id in images:
            uri = datastore.get_image_uri(image_id)
            known = self.cache.known(version, uri)
            if known is None:
                if new >= self.max_new:
                    continue
                new += 1
                try:
                    known = self.cache.score(predictor, uri, version)
                except Exception as e:  # noqa: BLE001 - one unreadable image must not block the others
                    logger.warning(f"region_uncertainty: cannot score {image_id}: {e}")
                    continue
            scored[image_id] = known
        if not scored:
            return {"id": images[0], "fallback": "no image could be scored"}
        best = max(scored, key=lambda i: (scored[i], i))
        logger.info(f"region_uncertainty: {best} (score {scored[best]:.4f}, {len(scored)} scored, {new} new)")
        return {"id": best, "score": round(scored[best], 4),
                "model_version": version, "scored": len(scored)}
