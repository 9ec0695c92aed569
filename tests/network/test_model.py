"""Model files: build, save, load with weights_only, sha256 check, helpful weight errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torchvision.models import densenet121

from kneebatch.errors import WeightsError
from kneebatch.network.cache import get_model, model_loads
from kneebatch.network.checkpoints import is_published_imagenet, published_imagenet_prefix
from kneebatch.network.model import grey_input, load_model
from kneebatch.network.modelfile import check_model_file, save_model
from kneebatch.network.weights import build_model


def test_saved_model_loads_back_identically(tmp_path: Path) -> None:
    network, source = build_model(weights="random", seed=3)
    path = tmp_path / "m.pth"
    info = save_model(network, source, path)
    loaded = load_model(path)
    assert loaded.info == info and info.weights == "random:seed=3"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha256"] == info.sha256 and side["torch"] == torch.__version__
    saved = grey_input(copy.deepcopy(network), "imagenet").state_dict()
    restored = loaded.network.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert network.conv0.weight.shape[1] == 3, "the file keeps conv0's colour channels"
    assert not any(p.requires_grad for p in loaded.network.parameters())


def test_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_model(weights="random", seed=1)
    after = torch.rand(1)
    b, _ = build_model(weights="random", seed=1)
    c, _ = build_model(weights="random", seed=2)
    assert torch.equal(before, after)
    assert torch.equal(a.conv0.weight, b.conv0.weight)
    assert not torch.equal(a.conv0.weight, c.conv0.weight)


def test_a_changed_model_file_is_refused(tmp_path: Path) -> None:
    network, source = build_model(weights="random", seed=0)
    path = tmp_path / "m.pth"
    save_model(network, source, path)
    with path.open("r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"0123456789")
    with pytest.raises(WeightsError, match="sha256"):
        load_model(path)


def test_a_model_without_sidecar_is_refused(tmp_path: Path) -> None:
    network, source = build_model(weights="random", seed=0)
    path = tmp_path / "m.pth"
    save_model(network, source, path)
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="build-model"):
        load_model(path)


def test_a_model_file_of_the_older_summed_conv0_layout_says_rebuild(tmp_path: Path) -> None:
    network, source = build_model(weights="random", seed=0)
    path = tmp_path / "m.pth"
    save_model(network, source, path)
    side = path.with_suffix(".json")
    side.write_text(side.read_text().replace('"densenet121-inflated-3d"',
                                             '"densenet121-inflated-3d-1ch"'))
    with pytest.raises(WeightsError, match=r"older kneebatch.*build-model --weights random"):
        load_model(path)


def test_missing_model_file_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="kneebatch build-model"):
        load_model(tmp_path / "nope.pth")


def test_imagenet_without_internet_says_what_to_do(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a closed port: fails at once
    with pytest.raises(WeightsError, match="--weights /path/densenet121") as info:
        build_model(weights="imagenet")
    assert "internet" in info.value.message


def test_local_torchvision_checkpoint_with_old_key_names(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net2d = densenet121(weights=None)
    # torchvision's published file uses the old "norm.1" names; accept them as torchvision does
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
           for k, v in net2d.state_dict().items() if "num_batches_tracked" not in k}
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet121-local.pth"
    torch.save(old, path)
    network, source = build_model(weights=str(path))
    assert source.startswith("file:densenet121-local.pth")
    assert torch.allclose(network.conv0.weight.sum(dim=2), net2d.features.conv0.weight,
                          atol=1e-5)
    layer3d = network.denseblock1.denselayer1
    layer2d = net2d.features.denseblock1.denselayer1
    assert torch.equal(layer3d.norm1.weight, layer2d.norm1.weight)
    assert torch.allclose(layer3d.conv2.weight.sum(dim=2), layer2d.conv2.weight, atol=1e-6)


def test_bad_weights_value_is_explained(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="neither 'imagenet', 'random'"):
        build_model(weights="imagnet")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="torchvision densenet121 state dict"):
        build_model(weights=str(bad))


def test_get_model_loads_once_per_process(model_path: Path) -> None:
    first = get_model(model_path)
    loads = model_loads()
    assert get_model(model_path) is first
    assert model_loads() == loads


def test_files_given_to_the_wrong_option_get_the_command_that_fits(
        tmp_path: Path, model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = tmp_path / "densenet121-local.pth"
    torch.save(densenet121(weights=None).state_dict(), checkpoint)
    with pytest.raises(WeightsError, match=r"2D checkpoint.*build it first: kneebatch build-model "
                                           r"--weights .*densenet121-local.pth"):
        check_model_file(checkpoint)
    with pytest.raises(WeightsError, match=r"already a kneebatch 3D model.*--model"):
        build_model(weights=str(model_path))
    # A checkpoint that is not torchvision's published file is recorded as a file, with a warning.
    with caplog.at_level("WARNING"):
        _, source = build_model(weights=str(checkpoint))
    assert source.startswith("file:densenet121-local.pth:sha256=")
    assert "not torchvision's published ImageNet DenseNet121 file" in caplog.text


def test_torchvisions_published_imagenet_hash_is_recognised() -> None:
    prefix = published_imagenet_prefix()
    assert prefix == "a639ec97"  # densenet121-a639ec97.pth, torchvision's IMAGENET1K_V1
    assert is_published_imagenet(prefix + "0" * 56)
    assert not is_published_imagenet("0" * 64)


@pytest.mark.parametrize("text", ["imagenet:IMAGENET1K_V1", "random:seed=7",
                                  "file:densenet121-custom.pth:sha256=0123456789abcdef"],
                         ids=["imagenet", "random", "file"])
def test_weights_source_round_trips_its_recorded_form(text: str) -> None:
    from kneebatch.network.source import WeightsSource

    source = WeightsSource.parse(text)
    assert str(source) == text
    assert source.is_random == text.startswith("random")
    assert source.option == {"imagenet": "imagenet", "random": "random",
                             "file": "densenet121-custom.pth"}[source.kind]
