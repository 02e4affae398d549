"""Experiment tracking: JSONL round trip, TensorBoard present / absent, reading and plotting."""

import json
import sys
import types
import warnings

import matplotlib
import pytest

from minigpt import tracking
from minigpt.tracking import (
    MetricsLogger,
    columns,
    compare_runs,
    final_summary,
    plot_losses,
    plot_runs,
    read_metrics,
)

matplotlib.use("Agg")


class FakeWriter:
    """Records what a SummaryWriter would receive."""

    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def close(self):
        self.closed = True


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Make `from torch.utils.tensorboard import SummaryWriter` fail, as without tensorboard."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(tracking, "_TB_WARNED", False)


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeWriter.instances = []


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path) as log:
        log.log(0, loss=4.2, lr=0.0)
        log.log(10, loss=3.1, lr=1e-3, note="warm-up done")
        log({"iter": 20, "loss": 2.5})  # the trainer's callback form
    records = read_metrics(path)
    assert records == [{"iter": 0, "loss": 4.2, "lr": 0.0},
                       {"iter": 10, "loss": 3.1, "lr": 1e-3, "note": "warm-up done"},
                       {"iter": 20, "loss": 2.5}]
    cols = columns(records)
    assert cols["loss"] == [4.2, 3.1, 2.5] and cols["note"] == [None, "warm-up done", None]
    assert list(columns(records, ["iter"])) == ["iter"]
    with MetricsLogger(path) as log:  # appends, never truncates
        log.log(30, loss=2.0)
    assert len(read_metrics(path)) == 4


def test_logger_rejects_bad_steps(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl") as log:
        for bad in (1.5, "3", True):
            with pytest.raises(ValueError):
                log.log(bad, loss=1.0)
        with pytest.raises(ValueError):
            log.log(1, iter=2)
        with pytest.raises(ValueError, match="no 'iter' key"):
            log({"loss": 1.0})


def test_tensorboard_absent_warns_once_and_keeps_logging(tmp_path, no_tensorboard):
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        first = MetricsLogger(tmp_path / "a.jsonl", tensorboard_dir=tmp_path / "tb")
    assert first.writer is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second logger must not warn again
        second = MetricsLogger(tmp_path / "b.jsonl", tensorboard_dir=tmp_path / "tb")
    for log in (first, second):
        log.log(1, loss=1.0)
        log.close()
    assert read_metrics(tmp_path / "a.jsonl") == [{"iter": 1, "loss": 1.0}]


def test_tensorboard_present_gets_numeric_scalars(tmp_path, fake_tensorboard):
    log = MetricsLogger(None, tensorboard_dir=tmp_path / "tb")
    log.log(5, loss=2.0, tokens_per_s=1000, note="text", flag=True)
    log({"iter": 6, "loss": 1.5})
    writer = FakeWriter.instances[0]
    log.close()
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    assert writer.scalars == [("loss", 2.0, 5), ("tokens_per_s", 1000, 5), ("loss", 1.5, 6)]
    assert not list(tmp_path.glob("*.jsonl"))  # path=None: no JSONL


def test_real_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb") as log:
        log.log(1, loss=1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def _trainer_log(path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"iter": 10 * i, "train_loss": v + 0.1, "val_loss": v})
             for i, v in enumerate(losses)]
    lines.append(json.dumps({"final": {"iterations": 10 * (len(losses) - 1), "val_loss": 1.0}}))
    path.write_text("\n".join(lines) + "\n\n")
    return path


@pytest.mark.slow
def test_reading_trainer_logs_and_comparing(tmp_path):
    a = _trainer_log(tmp_path / "run-a" / "log.jsonl", [3.0, 2.0, 2.2])
    b = _trainer_log(tmp_path / "run-b" / "log.jsonl", [3.0, 2.5, 1.9])
    assert len(read_metrics(a)) == 3 and len(read_metrics(a, include_final=True)) == 4
    assert final_summary(a) == {"iterations": 20, "val_loss": 1.0}
    rows = compare_runs([a, b])
    assert rows[0] == {"run": "run-a", "last_val_loss": 2.2, "best_val_loss": 2.0, "best_iter": 10}
    assert rows[1]["best_iter"] == 20
    ax = plot_runs([a, b], "val_loss", logy=True)
    assert [line.get_label() for line in ax.get_lines()] == ["run-a", "run-b"]
    assert ax.get_xlabel() == "iter" and ax.get_ylabel() == "val_loss" and ax.get_title()
    assert list(ax.get_lines()[1].get_ydata()) == [3.0, 2.5, 1.9]
    with pytest.raises(ValueError, match="labels"):
        plot_runs([a, b], labels=["only one"])
    with pytest.raises(ValueError, match="no records"):
        plot_runs([a], "accuracy")


def test_bad_logs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no metrics log"):
        read_metrics(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"iter": 0, "loss": 1.0}\n{"iter": 1, "lo\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: not valid JSON"):
        read_metrics(broken)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="JSON object"):
        read_metrics(tmp_path / "list.jsonl")
    assert final_summary(_trainer_log(tmp_path / "x" / "log.jsonl", [1.0])) is not None
    (tmp_path / "plain.jsonl").write_text('{"iter": 0}\n')
    assert final_summary(tmp_path / "plain.jsonl") is None


@pytest.mark.parametrize("tail", ['{"iter": 1, "lo', '{"iter": 1, "lo\n', "\n\n", "   \n"])
def test_torn_or_blank_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, tail):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 0, "loss": 1.0}\n' + tail)
    torn = tail.strip() != ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_metrics(log) == [{"iter": 0, "loss": 1.0}]
    messages = [str(w.message) for w in caught]
    if torn:
        assert len(messages) == 1 and f"{log}, line 2: skipped a torn last line" in messages[0]
    else:
        assert messages == []  # blank lines are not damage


def test_plot_losses_reads_a_trainer_log(tmp_path):
    log = _trainer_log(tmp_path / "r" / "log.jsonl", [3.0, 2.5])
    ax = plot_losses(log, title="t")
    assert ax.get_xlabel() == "optimiser step" and ax.get_title() == "t"
    assert list(ax.get_lines()[1].get_ydata()) == [3.0, 2.5]
