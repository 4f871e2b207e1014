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


def assert_pngs(folder, names=OUTPUTS):
    from PIL import Image

    for name in names:
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


# --- detectors: checkpoints of `deformable train detect` ----------------------------------------

DETECTOR_OUTPUTS = ("explain.png", "backbone_sampling_locations.png", "backbone_receptive_field.png",
                    "backbone_saliency.png", "roi_sampling_locations.png", "roi_receptive_field.png",
                    "roi_saliency.png")  # fmt: skip


def assert_one_line_error(argv, message, tmp_path, capsys):
    """explain on ``argv`` exits 2 with one error line holding ``message`` and writes nothing."""
    assert explain.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deformable explain: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def trained_like(build, spec, offset_std):
    """``build(spec)`` (seed 0) with small offsets, as after some training."""
    from deformable.nn import DeformConv2d

    torch.manual_seed(0)
    model = build(spec)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DeformConv2d):
                layer.conv_offset.weight.normal_(0, offset_std)
    return model


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """Checkpoints as `deformable train detect --image-size 64` writes them (the training loop's
    keys, the run's model_spec and data folder), built with build_detector: a DCNv2 detector with
    modulated deformable RoI pooling and small offsets (as after some training), a regular one
    whose classifier favours class 1 (so it detects), and one that finds nothing (its classifier
    always says background). 64-px generated scenes are their data."""
    from deformable.data.scenes import CATEGORIES, generate_scenes
    from deformable.engine import save_checkpoint
    from deformable.models.build import build_detector

    root = tmp_path_factory.mktemp("detect")
    scenes = root / "scenes"
    generate_scenes(str(scenes), "train", 2, size=64, max_objects=2)
    generate_scenes(str(scenes), "val", 2, size=64, max_objects=2)
    dcnv2 = {"task": "detect", "model": "fasterrcnn_resnet18_fpn", "deform_stages": [3, 4, 5],
             "modulated": True, "roi_pool": "mdeform", "mimic": False, "mimic_crop_size": 64,
             "mimic_rois_per_image": 8, "image_size": 64, "num_classes": len(CATEGORIES) + 1,
             "classes": CATEGORIES}  # fmt: skip
    regular = dict(dcnv2, deform_stages=[], modulated=False, roi_pool="align")
    paths = {}
    for name, spec in (("dcnv2", dcnv2), ("regular", regular), ("blind", regular)):
        model = trained_like(build_detector, spec, 0.002)
        with torch.no_grad():
            if name != "dcnv2":
                model.roi_heads.box_predictor.cls_score.bias[1 if name == "regular" else 0] = 50.0
        paths[name] = str(root / name / "last.pt")
        save_checkpoint(paths[name], {"model": model.state_dict(), "optimizer": {}, "scheduler": {},
                                      "rng": torch.get_rng_state(), "epoch": 0, "history": {},
                                      "config": {}, "model_spec": spec, "data": str(scenes)})  # fmt: skip
    paths["scenes"] = str(scenes)
    return paths


def image_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_a_detector_checkpoint_draws_a_conv5_node_and_a_per_roi_node(detectors, tmp_path, capsys):
    out = tmp_path / "one"
    code = explain.main(["--checkpoint", detectors["dcnv2"], "--index", "1", "--box", "8", "10",
                         "40", "30", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_pngs(out, DETECTOR_OUTPUTS)
    width, height = image_size(out / "explain.png")
    assert width > 4 * height  # one row: 3 views of the conv5 node, 3 of the per-RoI node
    printed = capsys.readouterr().out
    assert "RoI (8, 10, 40, 30): --box" in printed
    assert "DCNv2 conv3-5 + mdeform RoI pooling" in printed
    # the conv5 node nearest the box's centre (20, 24): conv5 node (y, x) is at (32 y, 32 x)
    assert "backbone.body.layer4.1.conv2 node (1, 1): 729 sampling points" in printed
    assert "per-RoI node: 7,056 points from 49 bins x 4 samples, P2" in printed


def test_detector_checkpoints_side_by_side_at_the_first_ones_best_detection(detectors, tmp_path, capsys):
    out = tmp_path / "two"
    code = explain.main(["--checkpoint", detectors["regular"], detectors["dcnv2"],
                         "--error-bound", "0.5", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_pngs(out, DETECTOR_OUTPUTS)
    width, height = image_size(out / "explain.png")
    assert 1.5 * height < width < 3.5 * height  # two rows
    one_view = image_size(out / "roi_saliency.png")
    assert one_view[0] > 1.5 * one_view[1]  # the two models side by side
    printed = capsys.readouterr().out
    assert "most confident detection: 0, score 1.00" in printed  # class 1 is the digit "0"
    assert printed.count("per-RoI node: ") == 2


@pytest.mark.parametrize("case, message", [
    ("box_outside", "--box (8, 10, 80, 30) is not inside the 64x64 image"),
    ("box_reversed", "--box (40, 10, 8, 30) is not inside the 64x64 image"),
    ("no_detection", "regular: no detection in the image"),
    ("classifier", "holds a classify model 'resnet18'; explain draws DigitNet checkpoints"),
    ("rfcn", "holds an R-FCN ('rfcn_resnet18'), which has no 2fc box head"),
    ("two_kinds", "the checkpoints hold different kinds of network (detector, digitnet)"),
    ("unreadable_image", "cannot read image '{tmp}/text.png'"),
    ("missing_data", "the checkpoint's data folder '{tmp}/gone' does not exist"),
    ("bad_index", "--index must be in [0, 2) (the validation images of"),
    ("bad_node", "--node: node (5, 0) is outside the layer's 2x2 output map"),
    ("box_for_digits", "--box is for detector checkpoints"),
])  # fmt: skip
def test_bad_detector_input_is_an_error_naming_it(detectors, checkpoints, tmp_path, capsys, case,
                                                  message):  # fmt: skip
    from deformable.engine import load_checkpoint

    (tmp_path / "text.png").write_text("not an image")
    if case in ("classifier", "rfcn", "missing_data"):
        state = {k: v for k, v in load_checkpoint(detectors["regular"]).items() if k != "optimizer"}
        if case == "classifier":
            state["model_spec"] = {"model": "resnet18", "num_classes": 3, "deform_stages": [],
                                   "modulated": False, "image_size": 32}  # fmt: skip
        elif case == "rfcn":
            state["model_spec"] = dict(state["model_spec"], model="rfcn_resnet18")
        else:
            state["data"] = str(tmp_path / "gone")
        torch.save(state, tmp_path / "other.pt")
    box = ["--box", "8", "10", "40", "30"]
    argv = {
        "box_outside": ["--checkpoint", detectors["regular"], "--box", "8", "10", "80", "30"],
        "box_reversed": ["--checkpoint", detectors["regular"], "--box", "40", "10", "8", "30"],
        "no_detection": ["--checkpoint", detectors["blind"]],
        "classifier": ["--checkpoint", str(tmp_path / "other.pt")],
        "rfcn": ["--checkpoint", str(tmp_path / "other.pt")],
        "two_kinds": ["--checkpoint", detectors["regular"], checkpoints["regular"]],
        "unreadable_image": ["--checkpoint", detectors["regular"], "--image", str(tmp_path / "text.png")],
        "missing_data": ["--checkpoint", str(tmp_path / "other.pt")] + box,
        "bad_index": ["--checkpoint", detectors["regular"], "--index", "2"] + box,
        "bad_node": ["--checkpoint", detectors["regular"], "--node", "5", "0"] + box,
        "box_for_digits": ["--checkpoint", checkpoints["regular"]] + box,
    }[case]
    assert_one_line_error(argv, message, tmp_path, capsys)


def test_an_rgb_image_file_of_another_size_is_resized_as_the_detector_does(detectors, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "wide.png"
    pixels = torch.zeros(40, 160, 3, dtype=torch.uint8)
    pixels[10:30, 20:60] = torch.tensor([250, 40, 40], dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    out = tmp_path / "wide"
    # the box in the file's pixels (160 x 40); the detector sees it at 64 x 16
    code = explain.main(["--checkpoint", detectors["regular"], "--image", str(path), "--box", "20",
                         "10", "60", "30", "--depth", "2", "--error-bound", "0.5", "--out",
                         str(out)])  # fmt: skip
    assert code == 0
    assert "RoI (8, 4, 24, 12): --box" in capsys.readouterr().out
    assert (out / "explain.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def segmenters(tmp_path_factory):
    """Checkpoints as `deformable train segment --image-size 48` writes them, built with
    build_segmenter: a regular DeepLabV3-ResNet-18 and a DCNv2-conv5 one with small offsets (as
    after some training); 48-px generated segmentation scenes are their data."""
    from deformable.data.scenes import CATEGORIES
    from deformable.data.segmentation import generate_segmentation_scenes
    from deformable.engine import save_checkpoint
    from deformable.models.build import build_segmenter

    root = tmp_path_factory.mktemp("segment")
    scenes = root / "scenes"
    generate_segmentation_scenes(str(scenes), "train", 2, size=48, max_objects=2)
    generate_segmentation_scenes(str(scenes), "val", 2, size=48, max_objects=2)
    regular = {"task": "segment", "model": "deeplabv3_resnet18", "deform_stages": [],
               "modulated": False, "output_stride": 8, "atrous_rates": [2, 4, 6], "image_size": 48,
               "num_classes": len(CATEGORIES) + 1, "classes": ["background", *CATEGORIES]}  # fmt: skip
    dcnv2 = dict(regular, deform_stages=[5], modulated=True)
    paths = {}
    for name, spec in (("regular", regular), ("dcnv2", dcnv2)):
        model = trained_like(build_segmenter, spec, 0.01)
        paths[name] = str(root / name / "last.pt")
        save_checkpoint(paths[name], {"model": model.state_dict(), "optimizer": {}, "scheduler": {},
                                      "rng": torch.get_rng_state(), "epoch": 0, "history": {},
                                      "config": {}, "model_spec": spec, "data": str(scenes)})  # fmt: skip
    return paths


def test_segmenter_checkpoints_side_by_side(segmenters, tmp_path, capsys):
    out = tmp_path / "seg"
    code = explain.main(["--checkpoint", segmenters["regular"], segmenters["dcnv2"], "--index", "1",
                         "--error-bound", "0.5", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_pngs(out)
    width, height = image_size(out / "explain.png")
    assert height > width / 2  # two rows of three views
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("regular ") and "729 sampling points" in printed[0]
    assert printed[1].startswith("DCNv2 conv5 ") and "729 sampling points" in printed[1]


def test_a_segmenter_node_is_the_analysis_node(segmenters, tmp_path, capsys):
    """The command explains the node the library's analysis does for the same image and layer."""
    from deformable.analysis.chain import strongest_node
    from deformable.analysis.figures import node_views
    from deformable.analysis.loading import load_explainable, validation_segmentation_image

    loaded = load_explainable(segmenters["dcnv2"])
    assert loaded.kind == "segmenter" and loaded.label == "DCNv2 conv5"
    image, source = validation_segmentation_image(loaded.data, 0, 48)
    assert image.shape == (3, 48, 48) and source.startswith("validation image 0 (val_")
    layer = "backbone.layer4.1.conv2"
    node = strongest_node(loaded.model, image, layer)
    views = node_views(loaded.model, image, layer, node, depth=3, error_bound=0.5)
    code = explain.main(["--checkpoint", segmenters["dcnv2"], "--error-bound", "0.5", "--out",
                         str(tmp_path / "one")])  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"saliency region {views.saliency.size} px" in line


def test_an_rgb_image_file_is_resized_as_the_segmenter_was_trained(segmenters, tmp_path, capsys):
    from PIL import Image

    from deformable.analysis.loading import fit_longer_side

    path = tmp_path / "wide.png"
    pixels = torch.zeros(40, 160, 3, dtype=torch.uint8)
    pixels[10:30, 20:60] = torch.tensor([250, 40, 40], dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    assert fit_longer_side(torch.rand(3, 40, 160), 48).shape == (3, 12, 48)
    code = explain.main(["--checkpoint", segmenters["regular"], "--image", str(path), "--depth", "2",
                         "--error-bound", "0.5", "--out", str(tmp_path / "wide")])  # fmt: skip
    assert code == 0
    assert_pngs(tmp_path / "wide")


@pytest.mark.parametrize("case, message", [
    ("bad_index", "--index must be in [0, 2) (the validation images of"),
    ("missing_data", "the checkpoint's data folder '{tmp}/gone' does not exist"),
    ("box", "--box is for detector checkpoints"),
    ("two_kinds", "the checkpoints hold different kinds of network (detector, segmenter)"),
])  # fmt: skip
def test_bad_segmenter_input_is_an_error_naming_it(segmenters, detectors, tmp_path, capsys, case,
                                                   message):  # fmt: skip
    from deformable.engine import load_checkpoint

    if case == "missing_data":
        state = {k: v for k, v in load_checkpoint(segmenters["regular"]).items() if k != "optimizer"}
        state["data"] = str(tmp_path / "gone")
        torch.save(state, tmp_path / "other.pt")
    argv = {
        "bad_index": ["--checkpoint", segmenters["regular"], "--index", "2"],
        "missing_data": ["--checkpoint", str(tmp_path / "other.pt")],
        "box": ["--checkpoint", segmenters["regular"], "--box", "8", "10", "40", "30"],
        "two_kinds": ["--checkpoint", segmenters["regular"], detectors["regular"]],
    }[case]
    assert_one_line_error(argv, message, tmp_path, capsys)
