"""``deformable explain``: PNGs from demo and train checkpoints, and clear errors for bad input."""

import os
import subprocess
import sys

import pytest
import torch

from deformable.analysis.loading import load_image
from deformable.commands import explain

PNG = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("explain.png", "sampling_locations.png", "receptive_field.png", "saliency.png")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from deformable.experiments.digits import DigitsConfig, run

    out = tmp_path_factory.mktemp("demo")
    run(str(out), DigitsConfig(epochs=1, seeds=1, copies=1, train_limit=64),
        variants=("regular", "dcnv2"), progress=False)  # fmt: skip
    return {v: str(out / f"{v}.pt") for v in ("regular", "dcnv2")}


def assert_pngs(folder):
    from PIL import Image

    for name in OUTPUTS:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG, name
        with Image.open(path) as image:
            assert min(image.size) > 200
            assert len(image.getcolors(1 << 20) or range(1000)) > 50  # not blank


def test_writes_pngs_for_several_checkpoints_side_by_side(checkpoints, tmp_path, capsys):
    out = tmp_path / "views"
    code = explain.main(["--checkpoint", checkpoints["regular"], checkpoints["dcnv2"],
                         "--index", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_pngs(out)
    printed = capsys.readouterr().out
    assert "729 sampling points" in printed and "DCNv2" in printed


def test_an_image_file_a_layer_and_a_node(checkpoints, tmp_path):
    from PIL import Image

    path = tmp_path / "digit.png"
    pixels = torch.zeros(60, 60, dtype=torch.uint8)
    pixels[15:45, 25:35] = 255
    Image.fromarray(pixels.numpy()).save(path)
    assert load_image(str(path)).shape == (1, 40, 40)
    out = tmp_path / "views"
    code = explain.main(["--checkpoint", checkpoints["dcnv2"], "--image", str(path), "--layer",
                         "features.8", "--node", "5", "4", "--depth", "0", "--grow", "gradient",
                         "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_pngs(out)


@pytest.mark.parametrize("case, message", [
    ("missing_checkpoint", "checkpoint '{tmp}/nope.pt' does not exist"),
    ("not_a_checkpoint", "checkpoint '{tmp}/text.pt' cannot be read"),
    ("wrong_dict", "is not a checkpoint of `deformable demo`"),
    ("bad_layer", "--layer: layer 'features.99' is not in the model's layer chain; valid names: "),
    ("bad_index", "--index must be in [0, 450)"),
    ("missing_image", "image '{tmp}/none.png' does not exist"),
    ("unreadable_image", "cannot read image '{tmp}/text.png'"),
    ("bad_node", "node (50, 0) is outside the layer's 10x10 output map"),
])  # fmt: skip
def test_bad_input_is_an_error_naming_it(checkpoints, tmp_path, capsys, case, message):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "text.png").write_text("not an image")
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    good = checkpoints["regular"]
    out = ["--out", str(tmp_path / "out")]
    argv = {
        "missing_checkpoint": ["--checkpoint", str(tmp_path / "nope.pt")],
        "not_a_checkpoint": ["--checkpoint", str(tmp_path / "text.pt")],
        "wrong_dict": ["--checkpoint", str(tmp_path / "dict.pt")],
        "bad_layer": ["--checkpoint", good, "--layer", "features.99"],
        "bad_index": ["--checkpoint", good, "--index", "450"],
        "missing_image": ["--checkpoint", good, "--image", str(tmp_path / "none.png")],
        "unreadable_image": ["--checkpoint", good, "--image", str(tmp_path / "text.png")],
        "bad_node": ["--checkpoint", good, "--node", "50", "0"],
    }[case]
    assert explain.main(argv + out) == 2
    err = capsys.readouterr().err
    assert err.startswith("deformable explain: error: ")
    assert message.format(tmp=tmp_path) in err
    if case == "bad_layer":
        assert "features.11" in err and "features.0" in err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        explain.main(["--checkpoint", "a.pt", "--image", "x.png", "--index", "1", "--out", "o"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deformable.commands.explain", "--checkpoint",
                             str(tmp_path / "missing.pt"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "missing.pt" in result.stderr


def test_explain_reads_a_train_checkpoint(tmp_path):
    """A checkpoint of `deformable train classify --model digitnet-*` draws like a demo one."""
    from deformable.commands import train

    run = tmp_path / "run"
    assert train.main(["classify", "--model", "digitnet-dcnv1", "--epochs", "1", "--limit", "32",
                       "--out", str(run), "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "explain"
    assert explain.main(["--checkpoint", str(run / "last.pt"), "--index", "3", "--out", str(out)]) == 0
    assert (out / "explain.png").stat().st_size > 10_000
