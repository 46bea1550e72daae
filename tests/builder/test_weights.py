"""``--weights``: torchvision-format checkpoints load strictly, and bad ones say what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from builder.__main__ import main
from builder.build import build
from builder.checks import cpu_session
from builder.options import BuildOptions, ModelOptions
from builder.resnet import ResNet, create_model
from builder.weights import (
    WeightsError,
    fetch,
    hub_checkpoints,
    load_weights,
    read_state_dict,
    resolve_weights,
)
from server.repository import MODEL_FILE, Verification, sha256_file


def trained_like(name: str, seed: int) -> ResNet:
    """A model whose every tensor, BatchNorm statistics included, is non-trivial."""
    model = create_model(name, ModelOptions(seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
                module.running_mean.uniform_(-0.1, 0.1, generator=generator)
                module.running_var.uniform_(1.0, 2.0, generator=generator)
                module.num_batches_tracked.fill_(c)
    return model


@pytest.fixture(scope="module")
def source() -> ResNet:
    return trained_like("resnet20", seed=11)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(images)


def fresh(name: str = "resnet20") -> ResNet:
    return create_model(name, ModelOptions(seed=99))


def test_state_dict_round_trip(tmp_path: Path, source: ResNet) -> None:
    path = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), path)
    model = fresh()
    assert not torch.equal(outputs(model), outputs(source))
    load_weights(model, path, "resnet20")
    assert torch.equal(outputs(model), outputs(source))


def test_safetensors_round_trip(tmp_path: Path, source: ResNet) -> None:
    path = tmp_path / "resnet20.safetensors"
    save_file(source.state_dict(), path)
    model = fresh()
    load_weights(model, path, "resnet20")
    assert torch.equal(outputs(model), outputs(source))


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module_prefix", "no_batch_counter"])
def test_training_script_formats(tmp_path: Path, source: ResNet, wrap: str) -> None:
    state = source.state_dict()
    if wrap == "module_prefix":
        checkpoint: object = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "no_batch_counter":  # torchvision's older checkpoints
        checkpoint = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        checkpoint = {wrap: state, "epoch": 90}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = fresh()
    load_weights(model, path, "resnet20")
    assert torch.equal(outputs(model), outputs(source))


def test_build_with_weights_serves_the_checkpoint(tmp_path: Path, source: ResNet) -> None:
    path = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), path)
    result = build(BuildOptions(arch="resnet20", repo=tmp_path / "repo", weights=path))
    images = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    (logits,) = cpu_session(result.version_dir / MODEL_FILE).run(None, {"images": images})
    with torch.no_grad():
        expected = source(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path, source: ResNet) -> None:
    state = source.state_dict()
    state["classifier.weight"] = state.pop("fc.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_weights(fresh(), path, "resnet20")
    message = str(info.value)
    assert "does not fit resnet20" in message
    assert "missing keys (1):\n    fc.weight" in message
    assert "unexpected keys (1):\n    classifier.weight" in message
    assert "wrongly shaped" not in message


def test_wrong_shapes_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "head100.pth"
    torch.save(create_model("resnet20", ModelOptions(num_classes=100)).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_weights(fresh(), path, "resnet20")
    message = str(info.value)
    assert "wrongly shaped keys (2)" in message
    assert "fc.weight: checkpoint (100, 64), resnet20 expects (10, 64)" in message
    assert "fc.bias: checkpoint (100,), resnet20 expects (10,)" in message
    assert "missing" not in message and "unexpected" not in message


def test_another_architecture_is_refused_with_a_short_list(tmp_path: Path) -> None:
    path = tmp_path / "resnet20.pth"
    torch.save(fresh().state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_weights(fresh("resnet56"), path, "resnet56")
    message = str(info.value)
    assert "missing keys (180):" in message  # 6 blocks × 3 stages × 2 convs × (1 + 5 BN)
    assert "layer1.3.conv1.weight" in message
    assert "… and 160 more" in message


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("notes.pth", b"these are not weights\n", "is not a readable PyTorch checkpoint"),
        ("empty.pth", b"", "is not a readable PyTorch checkpoint"),
        ("bad.safetensors", b"\x00\x01garbage", "is not a readable safetensors file"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, filename: str, content: bytes, expected: str) -> None:
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=expected):
        read_state_dict(path)


def test_a_pickled_tensor_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(path)


def test_cli_reports_a_bad_checkpoint_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "head100.pth"
    torch.save(create_model("resnet20", ModelOptions(num_classes=100)).state_dict(), path)
    repo = tmp_path / "repo"
    code = main(["build", "resnet20", "--weights", str(path), "--repo", str(repo)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fc.weight: checkpoint (100, 64), resnet20 expects (10, 64)" in err
    assert not repo.exists() or not any(repo.iterdir())


def test_cli_reports_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["build", "resnet20", "--weights", str(tmp_path / "nope.pth"), "--repo", str(tmp_path)]
    )
    assert code == 2
    assert "nope.pth does not exist" in capsys.readouterr().err


def test_weights_from_a_file_url_are_fetched_into_the_hub_cache(
    tmp_path: Path, source: ResNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL (here file://, nothing leaves the machine) is fetched into the torch hub cache
    as torchvision does, its name's hash prefix checked, and recorded in the recipe."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "published" / "resnet20.pth"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    named = path.with_name(f"resnet20-{sha256_file(path)[:8]}.pth")
    path.rename(named)
    result = build(BuildOptions(arch="resnet20", repo=tmp_path / "repo", weights=named.as_uri()))
    cached = hub_checkpoints() / named.name
    assert cached.is_file() and cached.parent == tmp_path / "torch" / "hub" / "checkpoints"
    recipe = Verification.load(result.version_dir).recipe
    assert recipe is not None
    assert recipe["weights"] == str(cached) and recipe["weights_origin"] == named.as_uri()
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    (logits,) = cpu_session(result.version_dir / MODEL_FILE).run(None, {"images": images})
    with torch.no_grad():
        expected = source(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    wrong = named.with_name("resnet20-00000000.pth")
    named.rename(wrong)
    with pytest.raises(WeightsError, match="cannot fetch weights from file://"):
        fetch(wrong.as_uri())
    assert not (hub_checkpoints() / wrong.name).exists()


def test_torchvision_weights_come_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    older = cache / "resnet50-0676ba61.pth"  # IMAGENET1K_V1: used when it is the one cached
    older.write_bytes(b"v1")
    found = resolve_weights("torchvision", "resnet50")
    assert found.path == older and found.origin.startswith("torchvision https://")
    default = cache / "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2, torchvision's DEFAULT
    default.write_bytes(b"v2")
    assert resolve_weights("torchvision", "resnet50").path == default
    with pytest.raises(WeightsError, match="torchvision has no ImageNet checkpoint for resnet20"):
        resolve_weights("torchvision", "resnet20")
    assert resolve_weights(str(default), "resnet50").origin == str(default)
