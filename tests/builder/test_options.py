"""`BuildOptions`: every field a flag of ``resnet-serve build``, keyword construction only,
and a round trip through the command line and the recipe that loses nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from builder import cli
from builder.__main__ import main
from builder.architectures import Layout
from builder.options import BuildOptions, ModelOptions
from builder.precision import Precision
from builder.recipe import Recipe
from server.repository import flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def parse_build(*argv: str) -> BuildOptions:
    args = build_parser().parse_args(["build", *argv])
    return BuildOptions(**flags.given(args, BuildOptions))


def test_every_field_is_a_documented_flag() -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {action.dest for action in subparsers.choices["build"]._actions}
    for name, field in BuildOptions.model_fields.items():
        assert name in dests, f"BuildOptions.{name} has no flag"
        assert field.description, f"BuildOptions.{name} has no description"


def test_round_trip_through_the_flags_and_the_recipe(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(7)))
    argv = [
        "resnet20",
        "--weights", str(tmp_path / "ckpt.pth"),
        "--repo", str(tmp_path / "repo"),
        "--name", "tiny",
        "--version", "3",
        "--opset", "17",
        "--input", "uint8",
        "--num-classes", "7",
        "--labels", str(labels),
        "--seed", "5",
        "--layout", "original",
        "--zero-init-last",
        "--stochastic-depth",
        "--precision", "int8",
        "--calibration", str(tmp_path / "photos"),
    ]  # fmt: skip
    options = parse_build(*argv)
    assert options == BuildOptions(
        arch="resnet20",
        weights=str(tmp_path / "ckpt.pth"),  # a file, a URL or "torchvision": resolved at build
        repo=tmp_path / "repo",
        name="tiny",
        version=3,
        opset=17,
        input_dtype="uint8",
        num_classes=7,
        labels=tuple(f"digit {i}" for i in range(7)),
        seed=5,
        layout=Layout.ORIGINAL,
        zero_init_last=True,
        stochastic_depth=0.5,
        precision=Precision.INT8,
        calibration=tmp_path / "photos",
    )
    fp16 = parse_build("resnet20", "--precision", "fp16", "--fp16-io")
    assert (fp16.precision, fp16.fp16_io) == (Precision.FP16, True)
    # Between them, the two command lines set every field away from its default: a field
    # added without a flag, or a flag that misses its field, shows here.
    defaults = BuildOptions(arch="resnet18")
    unchanged = {
        name
        for name in BuildOptions.model_fields
        if getattr(options, name) == getattr(defaults, name)
    }
    assert unchanged == {"fp16_io"}  # fp16 IO contradicts int8: set on the second line

    for parsed in (options, fp16):
        recorded = json.loads(json.dumps(parsed.model_dump(mode="json")))
        assert BuildOptions.model_validate(recorded) == parsed
    recipe = Recipe.model_validate(options.model_dump() | {"weights_sha256": "ab" * 32})
    again = Recipe.model_validate(json.loads(json.dumps(recipe.model_dump(mode="json"))))
    assert again == recipe
    assert again.bn_statistics is None  # weights were given: no BatchNorm statistics set
    # the recipe records the checkpoint as a local file (what --weights named, resolved)
    assert again.weights == Path(str(options.weights))
    assert all(
        getattr(again, name) == getattr(options, name)
        for name in BuildOptions.model_fields
        if name != "weights"
    )


def test_flag_defaults_are_the_fields_defaults() -> None:
    assert parse_build("resnet50") == BuildOptions(arch="resnet50")
    options = parse_build("resnet50", "--no-zero-init-last", "--stochastic-depth", "0.8")
    assert options.zero_init_last is False and options.stochastic_depth == 0.8


def test_positional_construction_is_refused() -> None:
    with pytest.raises(TypeError):
        BuildOptions("resnet20")  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelOptions(10, Layout.ORIGINAL)  # type: ignore[misc]


def test_options_are_frozen_and_checked() -> None:
    options = BuildOptions(arch="resnet20")
    with pytest.raises(ValidationError):
        options.seed = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="unknown architecture 'resnet99'"):
        BuildOptions(arch="resnet99")
    with pytest.raises(ValidationError, match="typo"):
        BuildOptions(arch="resnet20", typo=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        BuildOptions(arch="resnet20", name="../escape")
    with pytest.raises(ValidationError, match="int8 only"):
        options.updated(calibration=Path("photos"))  # a copy is checked as a new object is


def test_bad_flag_values_are_errors_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in (
        (["--version", "0"], "greater than or equal to 1"),
        (["--stochastic-depth", "1.5"], "less than or equal to 1"),
        (["--fp16-io"], "fp16 IO needs --precision fp16"),
    ):
        assert main(["build", "resnet20", "--repo", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
