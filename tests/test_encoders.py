"""Frozen encoders: shapes, recorded policies, tower-only loading, pooling, specs and offline failures."""

from __future__ import annotations

import pytest
import torch

from medrl.models.encoders import EncoderUnavailableError, TimmEncoder, encoder_from_spec
from medrl.models.hub import vision_tower
from medrl.models.qwen_tower import QwenVisionEncoder


def _images(n: int, channels: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def resnet() -> TimmEncoder:
    return TimmEncoder("resnet18", pretrained=False).load()


@pytest.mark.parametrize("size", [28, 64, 224])
@pytest.mark.parametrize("channels", [1, 3])
def test_timm_shapes(resnet, size, channels):
    features = resnet.encode(_images(2, channels, size))
    assert features.shape == (2, 512) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_timm_records_random_weights_and_size_policy(resnet):
    described = resnet.describe()
    assert described["pretrained"] is False and described["weights"] == "random init, seed 0"
    assert described["image_size"] == 224
    assert resnet.label == "resnet18 (random init)"


def test_timm_vit_at_native_28px():
    # ViTs need dynamic size and padding for 28 px inputs (28 is not a multiple of the 16 px patch).
    vit = TimmEncoder("vit_tiny_patch16_224", pretrained=False, image_size="native")
    assert vit.encode(_images(2, 1, 28)).shape == (2, 192)


def test_timm_pretrained_offline_fails_clearly():
    with pytest.raises(EncoderUnavailableError, match="pretrained: false"):
        TimmEncoder("resnet18", pretrained=True).load()


@pytest.fixture(scope="module")
def tower_encoders(tiny_dir):
    return {
        (pooling, features): QwenVisionEncoder(str(tiny_dir), pooling=pooling, features=features).load()
        for pooling in ("mean", "max")
        for features in ("merger", "pre_merger")
    }


@pytest.mark.parametrize("size", [28, 64, 224])
@pytest.mark.parametrize("channels", [1, 3])
def test_tower_shapes(tower_encoders, size, channels):
    images = _images(2, channels, size)
    assert tower_encoders["mean", "merger"].encode(images).shape == (2, 128)  # tiny's language width
    assert tower_encoders["mean", "pre_merger"].encode(images).shape == (2, 64)  # tiny's vision width


def test_tower_size_policy_is_explicit(tiny_dir):
    resized = QwenVisionEncoder(str(tiny_dir))  # default: 224 px, whatever the processor's own max_pixels
    native = QwenVisionEncoder(str(tiny_dir), image_size="native")
    for size in (28, 64):
        assert resized.resized(size, size) == (224, 224) and resized.tokens(size, size) == 64
        # tiny's processor keeps images between 56x56 and 112x112 pixels: 28 and 64 px both become 56 px.
        assert native.resized(size, size) == (56, 56) and native.tokens(size, size) == 4
    assert resized.describe()["min_max_pixels"] == [224 * 224, 224 * 224]
    assert native.describe()["min_max_pixels"] == [56 * 56, 112 * 112]
    assert resized.describe()["pretrained"] is False  # tiny is random weights


def test_tower_only_loading_equals_the_full_models_tower(tiny, tower_encoders):
    """The tower read alone from safetensors gives the same features as the tower inside the loaded VLM."""
    model, processor = tiny
    images = _images(3, 3, 28)
    inputs = processor.image_processor(
        images=images, size={"shortest_edge": 224 * 224, "longest_edge": 224 * 224}, return_tensors="pt"
    )
    with torch.no_grad():
        out = vision_tower(model)(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    merged = out.pooler_output.reshape(3, 64, -1)  # 64 tokens per image, in raster order
    pre = out.last_hidden_state.reshape(3, 256, -1)  # 4x as many before the 2x2 merge
    expected = {
        ("mean", "merger"): merged.mean(1),
        ("max", "merger"): merged.amax(1),
        ("mean", "pre_merger"): pre.mean(1),
        ("max", "pre_merger"): pre.amax(1),
    }
    for key, value in expected.items():
        torch.testing.assert_close(tower_encoders[key].encode(images), value, msg=str(key))
    # Only the tower was loaded: no language-model parameters behind the encoder.
    encoder = tower_encoders["mean", "merger"]
    tower_params = sum(p.numel() for p in encoder.tower.parameters())
    assert tower_params == sum(p.numel() for p in vision_tower(model).parameters())
    assert sum(p.numel() for p in model.parameters()) > 2 * tower_params


def test_describe_changes_with_every_feature_setting(tiny_dir):
    base = QwenVisionEncoder(str(tiny_dir)).fingerprint()
    for change in ({"pooling": "max"}, {"features": "pre_merger"}, {"image_size": "native"}, {"dtype": "bfloat16"}):
        assert QwenVisionEncoder(str(tiny_dir), **change).fingerprint() != base, change
    assert TimmEncoder("resnet18", pretrained=False).fingerprint() != TimmEncoder("resnet18").fingerprint()
    assert TimmEncoder("resnet18", False).fingerprint() != TimmEncoder("resnet18", False, seed=1).fingerprint()


def test_random_timm_weights_are_reproducible():
    images = _images(2, 3, 28)
    first = TimmEncoder("resnet18", pretrained=False, image_size="native").encode(images)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    torch.testing.assert_close(TimmEncoder("resnet18", pretrained=False, image_size="native").encode(images), first)


def test_specs():
    timm = encoder_from_spec("timm:resnet18,pretrained=false,image_size=native")
    assert isinstance(timm, TimmEncoder) and timm.pretrained is False and timm.image_size == "native"
    qwen = encoder_from_spec("qwen:Qwen/Qwen2.5-VL-3B-Instruct,pooling=max,image_size=112")
    assert isinstance(qwen, QwenVisionEncoder) and qwen.model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert qwen.pooling == "max" and qwen.image_size == 112
    with pytest.raises(ValueError, match="known keys"):
        encoder_from_spec("timm:resnet18,colour=blue")
    with pytest.raises(ValueError, match="KIND:NAME"):
        encoder_from_spec("clip:ViT-B")
    with pytest.raises(ValueError, match="pooling"):
        encoder_from_spec("qwen:tiny,pooling=median")


def test_features_can_feed_a_trainable_head(resnet):
    # encode() runs under no_grad, not inference_mode: inference tensors cannot be saved for backward.
    head = torch.nn.Linear(512, 2)
    head(resnet.encode(_images(2, 3, 28))).sum().backward()
    assert head.weight.grad is not None
