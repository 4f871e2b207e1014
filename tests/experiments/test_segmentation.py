"""DCNv1's DeepLab ablation: its tables."""

from deformable.experiments.segmentation import ablation_table, class_table

NAN = float("nan")


def _run(miou, accuracy, cat, dog, seconds):
    return {"val_mIoU": [0.0, miou], "val_pixel_accuracy": [0.0, accuracy], "val_IoU/cat": [0.0, cat],
            "val_IoU/dog": [0.0, dog], "seconds": seconds}


RUNS = [_run(0.4, 0.9, 0.5, NAN, [10.0, 12.0]), _run(0.6, 0.9, 0.7, 0.2, [14.0, 16.0])]


def test_ablation_table_cells():
    one = ablation_table({"a": RUNS[:1]}).splitlines()
    assert one == ["| setting | mIoU | pixel accuracy | s / epoch |", "|---|---|---|---|",
                   "| a | 40.0 | 90.0 | 11 |"]  # fmt: skip
    assert ablation_table({"a": RUNS}).splitlines()[2] == "| a | 50.0 ± 14.1 | 90.0 ± 0.0 | 13 |"


def test_class_table_averages_the_runs_that_scored_a_class():
    lines = class_table({"a": RUNS, "b": RUNS[:1]}, ["cat", "dog"]).splitlines()
    # dog: absent from the first run's truth and predictions (NaN), so its mean is the second run's
    assert lines == ["| class | a | b |", "|---|---|---|", "| cat | 60.0 | 50.0 |", "| dog | 20.0 | — |"]
