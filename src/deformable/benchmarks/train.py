"""Training steps of the demo's DigitNet: the regular CNN against DCNv1 and DCNv2, one run.

    deformable bench-train [--batch 64] [--size 40] [--repeats 10] [--json PATH]
    python -m deformable.benchmarks.train ...    (the same)

The demo's variants differ only in their two last 3x3 convolutions (deformable, with their
offset branches, in ``dcnv1`` / ``dcnv2``). A step is what each of the demo's batches costs
without its data loading: forward, cross-entropy, backward and an AdamW update, on a fixed batch
of images. Each variant runs in NCHW and in channels-last memory (the whole network and its input
converted; PyTorch's CPU convolutions are faster on it, and our kernels skip their layout
transposes). Medians of ``--repeats`` steps after a warm-up, the smallest of three rounds taken
in turns (:func:`deformable.benchmarks.timing.median_ms`); ratios are against the regular CNN in
the same memory format, as the demo's seconds per epoch compare them.

Why a benchmark of its own: in a network our operators run between other layers' work, with
their inputs and scratch buffers out of cache, and take longer than the same calls timed alone
(measured in the demo's network: 1.4x). The operator suite (``deformable bench``) times them alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deformable.benchmarks.timing import median_ms

VARIANTS = ("regular", "dcnv1", "dcnv2")
FORMATS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def _trainer(variant: str, memory_format: torch.memory_format, batch: int, size: int):
    """A closure running one training step of DigitNet ``variant`` on a fixed batch."""
    from deformable.models.digitnet import DigitNet

    torch.manual_seed(0)
    model = DigitNet(variant).to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 1, size, size, generator=generator)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def run(batch: int = 64, size: int = 40, repeats: int = 10) -> dict:
    """Milliseconds a training step of each variant in each memory format, and their ratios to
    the regular CNN's in the same format."""
    steps = {(variant, fmt): _trainer(variant, memory_format, batch, size)
             for fmt, memory_format in FORMATS.items() for variant in VARIANTS}  # fmt: skip
    times = median_ms(steps, repeats)
    rows = [{"variant": variant, "format": fmt, "ms": times[(variant, fmt)],
             "vs_regular": times[(variant, fmt)] / times[("regular", fmt)]}
            for fmt in FORMATS for variant in VARIANTS]  # fmt: skip
    return {"batch": batch, "size": size, "threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict) -> str:
    from deformable.models.digitnet import LABELS

    lines = [f"| DigitNet, batch {result['batch']}, {result['size']}x{result['size']} | memory | "
             "ms a step | vs regular |",
             "|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        lines.append(f"| {LABELS[row['variant']]} | {row['format']} | {row['ms']:.1f} | "
                     f"{row['vs_regular']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    from deformable.commands.bench_train import main

    raise SystemExit(main())
