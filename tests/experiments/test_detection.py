"""DCNv2's ablation: its table."""

from deformable.engine.detection import COCO_METRICS, MASK_METRICS
from deformable.experiments.detection import ablation_table


def test_ablation_table_cells():
    runs = [{**{f"val_{m}": [0.0, v] for m, v in zip(COCO_METRICS, values)}, "seconds": seconds}
            for values, seconds in (((0.1, 0.2, 0.3, 0.4, 0.5, float("nan")), [10.0, 12.0]),
                                    ((0.2, 0.2, 0.3, 0.4, 0.5, float("nan")), [14.0, 16.0]))]  # fmt: skip
    one = ablation_table({"a": runs[:1]}).splitlines()
    assert one[:2] == ["| setting | AP | AP50 | AP75 | APs | APm | APl | s / epoch |",
                       "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    assert one[2] == "| a | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | — | 11 |"
    two = ablation_table({"a": runs}).splitlines()[2]
    assert two == "| a | 15.0 ± 7.1 | 20.0 ± 0.0 | 30.0 ± 0.0 | 40.0 ± 0.0 | 50.0 ± 0.0 | — | 13 |"


def test_ablation_table_has_mask_columns_when_every_run_has_mask_metrics():
    box = {f"val_{m}": [0.25] for m in COCO_METRICS}
    masks = {f"val_{m}": [0.5] for m in MASK_METRICS}
    lines = ablation_table({"a": [{**box, **masks, "seconds": [3.0]}]}).splitlines()
    assert lines[0] == ("| setting | AP | AP50 | AP75 | APs | APm | APl | mask AP | mask AP50 | mask AP75 | "
                        "mask APs | mask APm | mask APl | s / epoch |")  # fmt: skip
    assert lines[2] == "| a | " + " | ".join(["25.0"] * 6 + ["50.0"] * 6) + " | 3 |"
    # a run without mask metrics (a Faster R-CNN) keeps the box table
    mixed = ablation_table({"a": [{**box, **masks, "seconds": [3.0]}], "b": [{**box, "seconds": [3.0]}]})
    assert "mask" not in mixed
