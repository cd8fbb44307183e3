"""Tiny-config shape and contract tests for anatomy_vlm.model.

The real LiteMedSAM weights are loaded once per module; the 75-GFLOP encoder runs once (about 2-6 s on this
2-core CPU) and its embedding is reused by every test that needs one.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from anatomy_vlm.anatomy import NUM_REGIONS
from anatomy_vlm.model.query_mask_head import soft_boxes
from anatomy_vlm.model import (
    AnatomyDecoder,
    BoxRefiner,
    AnatomyOutput,
    AnatomyVLM,
    CheckpointError,
    Letterbox,
    LiteMedSAMEncoder,
    ViTEncoder,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    build_model,
    QueryMaskHead,
    letterbox,
    resolve_config,
)
from anatomy_vlm.model.encoder import litemedsam_checkpoint_path

pytestmark = pytest.mark.usefixtures("two_torch_threads")

TINY_DECODER = {"d_model": 32, "num_layers": 2, "num_heads": 2, "dim_feedforward": 64, "dropout": 0.0,
                "embed_dim": 16, "global_embedding": True, "feature_pool": 2, "aux_outputs": True}
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def model() -> AnatomyVLM:
    """Real LiteMedSAM encoder + SAM box-prompted mask head, tiny decoder, in eval mode."""
    torch.manual_seed(0)
    return build_model({"decoder": TINY_DECODER, "mask_head": {"kind": "sam"}}).eval()


@pytest.fixture(scope="module")
def random_encoder() -> LiteMedSAMEncoder:
    """A LiteMedSAM encoder with random weights (built once: TinyViT's constructor takes 1-2 s here)."""
    return LiteMedSAMEncoder(pretrained=False)


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def radiograph_input():
    """A synthetic portrait 'radiograph' (bright vertical band = spine) letterboxed to the model input."""
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (300, 200)).astype(np.float32)
    img[:, 90:110] += 80
    return letterbox(img)


@pytest.fixture(scope="module")
def embedding(model, radiograph_input) -> torch.Tensor:
    """The encoder run once: (1, 256, 64, 64)."""
    x, _ = radiograph_input
    with torch.inference_mode():
        t0 = time.perf_counter()
        e = model.encode(x[None])
        print(f"\nLiteMedSAM encoder forward 1x3x256x256: {time.perf_counter() - t0:.2f} s")
    return e.clone()


# ----- boxes and preprocessing -------------------------------------------------------------------------------

def test_box_conversions_use_monai_modes_and_keep_gradients():
    cxcywh = torch.tensor([[[0.5, 0.25, 0.2, 0.1]]], requires_grad=True)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == (1, 1, 4)
    torch.testing.assert_close(xyxy, torch.tensor([[[0.4, 0.2, 0.6, 0.3]]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    xyxy.sum().backward()
    assert cxcywh.grad is not None
    with pytest.raises(ValueError, match="last dimension of 4"):
        box_cxcywh_to_xyxy(torch.zeros(2, 3))


def test_letterbox_contract_on_an_asymmetric_image():
    img = np.zeros((300, 200), np.float32)
    img[0:30, 170:200] = 10.0  # top-right corner bright: x = column, y = row
    x, lb = letterbox(img)
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert lb == Letterbox((300, 200), (256, 171), 256)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert float(x[:, :, 171:].abs().max()) == 0.0  # right padding
    assert float(x[0, :20, 150:171].mean()) > 0.8 and float(x[0, 200:, :100].max()) == 0.0  # not flipped
    box = np.array([[170.0, 0.0, 200.0, 30.0], [0, 0, 200, 300]])
    inp = lb.boxes_to_input(box)
    np.testing.assert_allclose(inp[1], [0, 0, 171, 256])
    np.testing.assert_allclose(lb.boxes_to_original(inp), box, atol=1e-9)
    np.testing.assert_allclose(lb.boxes_to_original(torch.tensor(inp)).numpy(), box, atol=1e-4)
    masks = torch.zeros(2, 256, 256)
    masks[0, :26, 145:171] = 1.0
    back = lb.masks_to_original(masks)
    assert back.shape == (2, 300, 200)
    assert float(back[0, :25, 175:].min()) > 0.5 and float(back[0, 100:].max()) == 0.0
    assert letterbox(np.ones((5, 7)))[0].abs().max() == 0  # constant image -> zeros, no division by zero
    with pytest.raises(ValueError, match="2D grey image"):
        letterbox(np.zeros((2, 3, 4)))


# ----- encoder ---------------------------------------------------------------------------------------------

def test_litemedsam_weights_are_the_packages(model, package_state):
    enc = model.encoder
    assert isinstance(enc, LiteMedSAMEncoder)
    for key in ("neck.0.weight", "layers.2.blocks.5.attn.qkv.weight", "patch_embed.seq.0.c.weight"):
        assert torch.equal(enc.trunk.state_dict()[key], package_state[f"image_encoder.{key}"]), key
    mh = model.mask_head
    assert torch.equal(mh.mask_decoder.iou_token.weight, package_state["mask_decoder.iou_token.weight"])
    assert torch.equal(mh.prompt_encoder.point_embeddings[2].weight,
                       package_state["prompt_encoder.point_embeddings.2.weight"])


def test_encoder_embedding_shape(embedding):
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.isfinite(embedding).all() and float(embedding.std()) > 0


def test_encoder_rejects_wrong_input_size(model):
    with pytest.raises(ValueError, match="letterbox"):
        model.encoder(torch.zeros(1, 3, 128, 128))


def test_freezing_keeps_only_the_last_blocks_trainable(random_encoder):
    enc = random_encoder
    enc.set_trainable_blocks(2)

    def trainable():
        return {n for n, p in enc.named_parameters() if p.requires_grad}

    names = {n for n, _ in enc.named_parameters()}
    last_two = {n for n in names if n.startswith(("trunk.layers.3.", "trunk.neck."))}
    assert trainable() == last_two and last_two
    enc.train()
    assert not enc.trunk.patch_embed.training and not enc.trunk.layers[2].blocks[5].training  # frozen: eval
    assert enc.trunk.layers[3].blocks[1].training
    enc.set_trainable_blocks(3)
    third = {n for n in names if n.startswith(("trunk.layers.2.blocks.5.", "trunk.layers.2.downsample."))}
    assert trainable() == last_two | third
    enc.set_trainable_blocks(0)
    assert trainable() == set()
    enc.set_trainable_blocks(None)
    assert trainable() == names
    with pytest.raises(ValueError, match="trainable_blocks"):
        enc.set_trainable_blocks(-1)


def test_loading_weights_refreshes_tinyvit_attention_cache(random_encoder, package_state):
    enc = random_encoder.eval()  # eval caches the attention-bias table 'ab'
    attn = enc.trunk.layers[1].blocks[0].attn
    enc.trunk.load_state_dict({k[len("image_encoder."):]: v for k, v in package_state.items()
                               if k.startswith("image_encoder.")})
    torch.testing.assert_close(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])
    # also when the encoder is loaded as part of a bigger module (how a whole-model checkpoint is loaded)
    wrapper = torch.nn.ModuleDict({"encoder": enc})
    state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    state["encoder.trunk.layers.1.blocks.0.attn.attention_biases"] += 1.0
    wrapper.load_state_dict(state)
    torch.testing.assert_close(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])


def test_missing_or_garbage_litemedsam_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        LiteMedSAMEncoder(tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        LiteMedSAMEncoder(bad)


def _tiny_vit_file(tmp_path, wrap: bool = True):
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, **TINY_VIT)
    path = tmp_path / "tiny_vit.pth"
    sd = vit.state_dict()
    torch.save({"model": sd, "epoch": 3} if wrap else sd, path)
    return path, sd


def test_vit_encoder_loads_a_local_checkpoint(tmp_path):
    path, sd = _tiny_vit_file(tmp_path)
    enc = ViTEncoder(path, model_name="vit_tiny_patch16_224", img_size=64, model_kwargs=TINY_VIT,
                     trainable_blocks=1)
    for key in ("blocks.1.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight"):
        assert torch.equal(enc.vit.state_dict()[key], sd[key]), key
    out = enc(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 32, 4, 4) and enc.out_channels == 32 and enc.feature_size == (4, 4)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vit.blocks.1.", "vit.norm.")) for n in trainable)
    # a different input size resamples the position embedding (timm's checkpoint_filter_fn)
    enc96 = ViTEncoder(path, model_name="vit_tiny_patch16_224", img_size=96, model_kwargs=TINY_VIT)
    assert enc96(torch.rand(1, 3, 96, 96)).shape == (1, 32, 6, 6)
    assert torch.equal(enc96.vit.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"])


def test_vit_encoder_bad_checkpoints_raise(tmp_path):
    kw = dict(model_name="vit_tiny_patch16_224", img_size=64, model_kwargs=TINY_VIT)
    with pytest.raises(CheckpointError, match="not found"):
        ViTEncoder(tmp_path / "missing.pth", **kw)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="cannot read"):
        ViTEncoder(garbage, **kw)
    path, _ = _tiny_vit_file(tmp_path, wrap=False)
    with pytest.raises(CheckpointError, match="does not fit"):  # weights of a 2-block ViT into a 3-block one
        ViTEncoder(path, **{**kw, "model_kwargs": {**TINY_VIT, "depth": 3}})
    notensors = tmp_path / "dict.pth"
    torch.save({"epoch": 1}, notensors)
    with pytest.raises(CheckpointError, match="state dict"):
        ViTEncoder(notensors, **kw)


# ----- decoder, mask head, whole model ---------------------------------------------------------------------

def test_decoder_query_count_comes_from_the_registry(model):
    dec = model.decoder
    assert dec.num_queries == NUM_REGIONS
    assert dec.query_pos.weight.shape == (NUM_REGIONS, TINY_DECODER["d_model"])


def test_decoder_box_prior_is_the_starting_point():
    dec = AnatomyDecoder(in_channels=8, d_model=16, num_layers=1, num_heads=2, dim_feedforward=16, embed_dim=8)
    prior = torch.rand(NUM_REGIONS, 4) * 0.5 + 0.25
    dec.set_box_prior(prior)
    out = dec(torch.randn(2, 8, 6, 5))
    torch.testing.assert_close(out.boxes, prior.expand(2, -1, -1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="box prior"):
        dec.set_box_prior(torch.rand(3, 4))


def test_forward_on_cached_embeddings_shapes(model, embedding):
    with torch.no_grad():
        out = model(embeddings=embedding.expand(2, -1, -1, -1))
    assert isinstance(out, AnatomyOutput)
    assert out.boxes.shape == (2, NUM_REGIONS, 4)
    assert float(out.boxes.min()) >= 0 and float(out.boxes.max()) <= 1
    assert out.presence_logits.shape == (2, NUM_REGIONS) and out.scores.shape == (2, NUM_REGIONS)
    assert out.region_embeddings.shape == (2, NUM_REGIONS, TINY_DECODER["embed_dim"])
    assert out.global_embedding.shape == (2, TINY_DECODER["embed_dim"])
    assert out.boxes_xyxy.shape == (2, NUM_REGIONS, 4)
    assert out.masks is None
    stages = len(model.box_refiner.stages)
    # earlier decoder layers, the decoder's own boxes, then every refinement stage but the last
    assert len(out.aux_outputs) == TINY_DECODER["num_layers"] - 1 + stages
    assert out.aux_outputs[0].boxes.shape == (2, NUM_REGIONS, 4)
    with pytest.raises(ValueError, match="images=, embeddings= or both"):
        model()


def test_decoder_trains_on_cached_embeddings(model, embedding):
    model.train()
    try:
        out = model(embeddings=embedding)
        # the refiner works on detached decoder boxes: the decoder's boxes train through their aux output
        aux = sum(a.boxes.sum() for a in out.aux_outputs)
        (out.boxes.sum() + aux + out.presence_logits.sum() + out.region_embeddings.sum()).backward()
    finally:
        model.eval()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.box_head[-1].weight.grad is not None
    assert model.box_refiner.stages[-1].out[-1].weight.grad is not None
    assert model.decoder.query_content.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_29_masks_come_from_one_batched_mask_decoder_call(model, embedding):
    calls = []
    handle = model.mask_head.mask_decoder.register_forward_hook(lambda m, i, o: calls.append(i))
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(embeddings=embedding, with_masks=True)
            print(f"\n{NUM_REGIONS} masks (decoder + one mask-decoder call): {time.perf_counter() - t0:.2f} s")
    finally:
        handle.remove()
    assert len(calls) == 1
    assert out.masks.shape == (1, NUM_REGIONS, 256, 256)
    assert out.mask_iou.shape == (1, NUM_REGIONS)
    assert torch.isfinite(out.masks).all()


def test_mask_head_prompts_and_batching(model, embedding):
    # two images x 2 boxes each; a box prompt gives a mask that differs from another box's mask
    boxes = torch.tensor([[[20.0, 20.0, 120.0, 230.0], [140.0, 30.0, 170.0, 60.0]]]).expand(2, -1, -1)
    with torch.inference_mode():
        res = model.mask_head(embedding.expand(2, -1, -1, -1), boxes, output_size=64)
    assert res.masks.shape == (2, 2, 64, 64) and res.iou.shape == (2, 2)
    torch.testing.assert_close(res.masks[0], res.masks[1])  # same image, same boxes -> same masks
    assert not torch.allclose(res.masks[0, 0], res.masks[0, 1])
    with pytest.raises(ValueError, match="embeddings"):
        model.mask_head(torch.zeros(1, 256, 32, 32), boxes[:1])


def test_build_model_vit_path_without_mask_head(tmp_path):
    path, _ = _tiny_vit_file(tmp_path)
    cfg = {"encoder": {"name": "vit", "checkpoint": str(path), "model_name": "vit_tiny_patch16_224",
                       "img_size": 64, "model_kwargs": TINY_VIT},
           "decoder": TINY_DECODER, "mask_head": {"enabled": False}}
    m = build_model(cfg).eval()
    assert m.mask_head is None and m.input_size == 64 and m.config["encoder"]["trainable_blocks"] == 0
    with torch.no_grad():
        out = m(images=torch.rand(2, 3, 64, 64))
    assert out.boxes.shape == (2, NUM_REGIONS, 4) and out.region_embeddings.shape == (2, NUM_REGIONS, 16)
    with pytest.raises(ValueError, match="no mask head"):
        m(images=torch.rand(1, 3, 64, 64), with_masks=True)


@pytest.mark.parametrize("config, message", [
    ({"encoders": {}}, "unknown config section"),
    ({"decoder": {"d_modle": 64}}, r"unknown key\(s\) \['d_modle'\]"),
    ({"encoder": {"name": "resnet50"}}, "encoder.name must be one of"),
    ({"encoder": {"name": "__import__('os')"}}, "encoder.name must be one of"),
    ({"encoder": {"trainable_blocks": -1}}, "trainable_blocks"),
    ({"encoder": {"trainable_blocks": "all"}}, "trainable_blocks"),
    ({"encoder": "litemedsam"}, "'encoder' must be a mapping"),
    ({"decoder": {"d_model": 30, "num_heads": 8}}, "divisible by num_heads"),
    ({"decoder": {"num_layers": 0}}, "num_layers must be a positive integer"),
    ({"decoder": {"dropout": 1.5}}, "dropout"),
    ({"mask_head": {"enabled": "yes"}}, "mask_head.enabled must be true or false"),
    ({"encoder": {"name": "vit"}, "mask_head": {"enabled": False}}, "checkpoint is required"),
    ({"encoder": {"name": "vit", "checkpoint": "/x.pth"}}, "mask_head.enabled needs encoder.name 'litemedsam'"),
    ({"encoder": {"name": "vit", "checkpoint": "/x.pth", "model_name": "resnet50"},
      "mask_head": {"enabled": False}}, "timm ViT"),
    (["encoder"], "must be a mapping"),
])
def test_build_model_rejects_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_resolved_config_is_complete_and_json_serialisable():
    import json

    cfg = resolve_config({"decoder": {"num_layers": 4}})
    assert cfg["decoder"]["num_layers"] == 4 and cfg["decoder"]["d_model"] == 256
    assert cfg["encoder"]["name"] == "litemedsam" and cfg["mask_head"]["enabled"] is True
    assert json.loads(json.dumps(cfg)) == cfg


def test_query_mask_head_gives_29_masks_in_one_pass_and_trains(embedding, package_state):
    """The default mask head: pixel features once per image, one logit map per region, gated by its box;
    starts from LiteMedSAM's upscaler and hypernetwork weights."""
    torch.manual_seed(0)
    m = build_model({"decoder": dict(TINY_DECODER, embed_dim=256)}).eval()
    assert isinstance(m.mask_head, QueryMaskHead)
    up = package_state["mask_decoder.output_upscaling.0.weight"]
    assert torch.equal(m.mask_head.upscale[0].weight, up)
    calls = []
    h = m.mask_head.upscale.register_forward_hook(lambda mod, i, o: calls.append(1))
    images = torch.rand(1, 3, 256, 256)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = m(images=images, embeddings=embedding, with_masks=True)
            print(f"\n{NUM_REGIONS} masks (query head): {time.perf_counter() - t0:.3f} s")
    finally:
        h.remove()
    assert calls == [1] and out.masks.shape == (1, NUM_REGIONS, 256, 256)
    # the box gate: a region's logits are higher inside its box than outside, other things equal
    boxes = torch.tensor([[[10.0, 20.0, 100.0, 200.0]] * NUM_REGIONS])
    with torch.no_grad():
        z = m.mask_head(embedding, torch.zeros(1, NUM_REGIONS, 256), boxes, images)
    assert float(z[0, 0, 100, 50]) > float(z[0, 0, 100, 200])
    m.train()
    out = m(images=images, embeddings=embedding, with_masks=True)
    out.masks.mean().backward()
    assert m.mask_head.upscale[0].weight.grad is not None and m.mask_head.box_weight.grad is not None
    assert m.decoder.query_content.weight.grad is not None  # masks train the region embeddings too
    with pytest.raises(ValueError, match="letterboxed image"):
        m.mask_head(embedding, torch.zeros(1, NUM_REGIONS, 256), boxes)


def test_soft_boxes_cover_pixel_centres_inside():
    g = soft_boxes(torch.tensor([[[2.0, 3.0, 6.0, 5.0]]]), 8)[0, 0]
    assert g[3, 3] > 0.8 and g[3, 2] > 0.7 and g[4, 5] > 0.7  # pixel centres (3.5, 2.5) and (4.5, 5.5) are inside
    assert g[2, 2] < 0.2 and g[3, 6] < 0.2 and g[5, 3] < 0.2


# ----- box refiner -------------------------------------------------------------------------------------

def test_box_refiner_starts_as_identity_and_keeps_boxes_valid():
    ref = BoxRefiner(in_channels=8, embed_dim=4, stages=2, channels=8, roi_size=4, hidden=16)
    feats = torch.randn(2, 8, 16, 16)
    boxes = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.2, 0.7, 0.1, 0.3]]).expand(2, 2, 4).contiguous()
    outs = ref(feats, boxes, torch.randn(2, 2, 4))
    assert len(outs) == 2
    torch.testing.assert_close(outs[-1], boxes, atol=1e-5, rtol=0)
    # random last layers: boxes still inside the frame with positive size
    for st in ref.stages:
        torch.nn.init.normal_(st.out[-1].weight, std=5.0)
    with torch.no_grad():
        out = ref(feats, boxes, torch.randn(2, 2, 4))[-1]
    xyxy = box_cxcywh_to_xyxy(out)
    assert float(xyxy.min()) >= 0 and float(xyxy.max()) <= 1
    assert bool((out[..., 2:] > 0).all())
    with pytest.raises(ValueError, match="context"):
        BoxRefiner(in_channels=8, embed_dim=4, stages=2, channels=8, context=[1.5])


def test_box_refiner_learns_to_move_edges_towards_what_the_features_show():
    """A bright square on the feature map; starting boxes shifted off it; a few hundred steps must
    bring the refined boxes much closer to the square than the starting boxes are."""
    torch.manual_seed(0)
    ref = BoxRefiner(in_channels=1, embed_dim=4, stages=2, channels=8, roi_size=8, hidden=64, context=[1.6, 1.2])
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3)

    def batch(n):
        c = torch.rand(n, 2) * 0.4 + 0.3
        s = torch.rand(n, 2) * 0.2 + 0.15
        truth = torch.cat([c, s], -1)
        feats = torch.zeros(n, 1, 32, 32)
        xy = (torch.arange(32) + 0.5) / 32
        for i in range(n):
            x0, y0, x1, y1 = box_cxcywh_to_xyxy(truth[i]).tolist()
            feats[i, 0] = (((xy >= y0) & (xy <= y1))[:, None] & ((xy >= x0) & (xy <= x1))[None]).float()
        start = truth + torch.cat([torch.randn(n, 2) * 0.04, torch.randn(n, 2) * 0.03], -1)
        return feats, start[:, None].clamp(0.05, 0.95), truth[:, None]

    def iou(a, b):
        from anatomy_vlm.evaluate import box_ious
        return float(torch.from_numpy(box_ious(box_cxcywh_to_xyxy(a).reshape(-1, 4).numpy(),
                                               box_cxcywh_to_xyxy(b).reshape(-1, 4).numpy())).mean())

    emb = torch.zeros(1, 1, 4)
    for _ in range(300):
        f, s, t = batch(16)
        outs = ref(f, s, emb.expand(16, -1, -1))
        loss = sum((o - t).abs().mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f, s, t = batch(64)
    with torch.no_grad():
        out = ref(f, s, emb.expand(64, -1, -1))[-1]
    before, after = iou(s, t), iou(out, t)
    assert after > before + 0.1, (before, after)


def test_box_refiner_can_sample_the_image_and_then_requires_it():
    ref = BoxRefiner(in_channels=8, embed_dim=4, stages=1, channels=8, roi_size=4, hidden=16, context=1.3,
                     image_roi=6)
    assert ref.uses_image
    feats, emb = torch.randn(2, 8, 16, 16), torch.randn(2, 3, 4)
    boxes = torch.rand(2, 3, 4) * 0.3 + 0.3
    images = torch.rand(2, 3, 64, 64)
    out = ref(feats, boxes, emb, images)[-1]
    torch.testing.assert_close(out, boxes, atol=1e-5, rtol=0)  # identity at init, image or not
    out.sum().backward()
    assert ref.stages[0].pixels[1].weight.grad is not None
    with pytest.raises(ValueError, match="letterboxed images"):
        ref(feats, boxes, emb)
    m = build_model({"encoder": {"pretrained": False}, "mask_head": {"enabled": False},
                     "decoder": TINY_DECODER, "box_refiner": {"image_roi": 8}})
    assert m.boxes_need_image
    with pytest.raises(ValueError, match="letterboxed images"):
        m(embeddings=torch.randn(1, 256, 64, 64))
    assert m(images=torch.rand(1, 3, 256, 256), embeddings=torch.randn(1, 256, 64, 64)).boxes.shape == (1, NUM_REGIONS, 4)
    with pytest.raises(ValueError, match="image_roi"):
        build_model({"encoder": {"pretrained": False}, "box_refiner": {"image_roi": -1}})


def test_box_refiner_min_context_widens_only_the_first_window():
    """A tiny box far from what the features show: with a minimum first window the first stage sees the
    bright square (its sampled grid is not empty); without it, it samples only zeros."""
    feats = torch.zeros(1, 8, 32, 32)
    feats[0, :, 4:8, 4:8] = 1.0  # top-left, about 0.19 of the frame away from the box below
    box = torch.tensor([[[0.35, 0.35, 0.02, 0.02]]])
    seen = {}
    for mc in (0.0, 0.5):
        ref = BoxRefiner(in_channels=8, embed_dim=4, stages=2, channels=8, roi_size=4, hidden=8, min_context=mc)
        assert ref.stages[1].min_half == 0.0 and ref.stages[0].min_half == mc / 2
        ref.proj = torch.nn.Identity()
        grids = []
        handle = ref.stages[0].roi[0].register_forward_hook(lambda m, i, o: grids.append(i[0].abs().sum()))
        ref(feats, box, torch.zeros(1, 1, 4))
        handle.remove()
        seen[mc] = float(grids[0])
    assert seen[0.0] == 0.0 and seen[0.5] > 0.0
    with pytest.raises(ValueError, match="min_context"):
        BoxRefiner(in_channels=8, embed_dim=4, min_context=1.5)
