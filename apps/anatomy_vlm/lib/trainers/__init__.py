"""Trainer adapters (placeholder).

The Anatomy-VLM trainer arrives with the model: a thin ``BasicTrainTask`` adapter over
``anatomy_vlm.train`` that fine-tunes on the corrected labels in the datastore
(``labels/final/<id>.nii.gz`` masks, ``labels/boxes/<id>.boxes.json`` boxes) and publishes a
checkpoint only when validation does not regress. Until then the app registers no trainer, so
``/info`` lists none and ``POST /train/...`` is refused by MONAI Label, rather than running a
stand-in that trains nothing.
"""
