"""Progress off a terminal (a DVC stage, a flow's log) is logged as lines; the training bar says how it ended."""

import logging

import torch

from fusionops import progress
from fusionops.config import TrainParams
from fusionops.labels import LabelTask
from fusionops.train import SplitData, fit


def test_off_a_terminal_progress_is_a_few_log_lines(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fusionops.progress")
    with progress.progress_bar(unit="img") as bar:  # pytest captures stderr: not a terminal
        assert isinstance(bar, progress.LoggedProgress)
        task = bar.add_task("image vectors", total=100)
        for _ in range(10):
            bar.advance(task, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("image vectors  100/100")  # faster than LOG_EVERY: the end only
    caplog.clear()
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with progress.progress_bar(unit="img") as bar:
        task = bar.add_task("image vectors", total=3)
        for _ in range(3):
            bar.advance(task)
    assert [r.getMessage().split("  ")[:2] for r in caplog.records] == [["image vectors", f"{i}/3"] for i in (1, 2, 3)]


def test_a_disabled_bar_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="fusionops.progress")
    with progress.progress_bar(disable=True) as bar:
        bar.advance(bar.add_task("predict", total=2), 2)
    assert not caplog.records


def _split(n: int, generator: torch.Generator) -> SplitData:
    y = torch.arange(n) % 2
    image = torch.randn(n, 8, generator=generator) + y[:, None] * 3  # separable: validation is perfect at once
    return SplitData(image=image, text=torch.randn(n, 4, generator=generator), y=y, item_ids=[str(i) for i in range(n)])


def test_training_says_when_it_stopped_early_and_never_loss_nan(caplog):
    caplog.set_level(logging.INFO, logger="fusionops.progress")
    g = torch.Generator().manual_seed(0)
    params = TrainParams(max_epochs=50, patience=3, batch_size=16, device="cpu")
    _, history, best = fit(_split(64, g), _split(32, g), LabelTask(["a", "b"]), params, modalities=("image", "text"))
    [line] = [r.getMessage() for r in caplog.records]
    assert len(history) < 50 and f"train fusion  {len(history)}/50  stopped early: best val macro-F1" in line
    assert f"at epoch {best['epoch']}, no better in 3 epochs (train.patience)" in line and "nan" not in line
