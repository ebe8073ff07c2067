"""Loss curves: read metrics.jsonl robustly, draw the right lines, write real images, fail in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from scratchgpt.cli import main
from scratchgpt.errors import ScratchGPTError
from scratchgpt.plot import comparison_figure, plot_run, plot_runs, read_run, run_figure


def write_run(run_dir: Path, scale: float = 1.0, tokens_per_step: int | None = None) -> Path:
    """A run directory with a hand-made metrics.jsonl: train rows every 10 steps, evaluations every 20."""
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(10, 61, 10):
        rows.append({"kind": "train", "step": step, "loss": scale * 3 / step ** 0.5, "lr": 1e-3 * step / 60,
                     "tokens_per_second": 1000.0})
        if step % 20 == 0:
            rows.append({"kind": "eval", "step": step, "train_loss": scale * 2.9 / step ** 0.5,
                         "val_loss": scale * 3.1 / step ** 0.5, "lr": 1e-3 * step / 60, "elapsed_seconds": step / 4})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (run_dir / "metrics.jsonl").write_text(text + "\n" + '{"kind": "train", "st', encoding="utf-8")  # crash mid-line
    if tokens_per_step:
        (run_dir / "last").mkdir()
        (run_dir / "last" / "train_state.json").write_text(json.dumps({"step": 60, "tokens_seen": 60 * tokens_per_step}))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_run_skips_blank_and_truncated_lines(tmp_path):
    run = read_run(write_run(tmp_path / "run"))
    assert [r["step"] for r in run.train_rows] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in run.eval_rows] == [20, 40, 60]


def test_run_figure_shows_per_step_loss_estimates_and_learning_rate(tmp_path):
    run = read_run(write_run(tmp_path / "run"))
    fig = run_figure(run)
    loss_axis, lr_axis = fig.axes
    lines = {line.get_label(): line for line in loss_axis.get_lines()}
    assert list(lines) == ["train (per step)", "train (estimate)", "val (estimate)"]
    assert list(lines["val (estimate)"].get_xdata()) == [20, 40, 60]
    assert lines["train (per step)"].get_alpha() < 1 and lines["val (estimate)"].get_marker() == "o"
    (lr_line,) = lr_axis.get_lines()
    assert list(lr_line.get_xdata()) == [10, 20, 30, 40, 50, 60]
    assert lr_line.get_ydata()[-1] == pytest.approx(1e-3)
    assert loss_axis.get_xlabel() == "step" and loss_axis.get_title() == "run"


def test_plot_run_writes_a_png_of_sensible_size(tmp_path):
    run_dir = write_run(tmp_path / "run")
    assert plot_run(run_dir) == run_dir / "loss.png"
    width, height = png_size(run_dir / "loss.png")
    assert 600 <= width <= 1000 and 300 <= height <= 600  # 7 x 4 inches at 110 dpi


def test_comparison_has_one_val_line_per_run_in_its_own_colour(tmp_path):
    runs = [read_run(write_run(tmp_path / name, scale)) for name, scale in (("small", 1.0), ("big", 0.8), ("wide", 0.9))]
    ax = comparison_figure(runs).axes[0]
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["small (val)", "big (val)", "wide (val)"]
    assert len({line.get_color() for line in labelled}) == 3
    assert len(ax.get_lines()) == 6  # and one faint per-step train line each
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["small (val)", "big (val)", "wide (val)"]


def test_comparison_x_axes_tokens_and_time(tmp_path):
    runs = [read_run(write_run(tmp_path / "a", tokens_per_step=768)), read_run(write_run(tmp_path / "b", tokens_per_step=384))]
    lines = [line for line in comparison_figure(runs, x="tokens").axes[0].get_lines() if "val" in line.get_label()]
    assert list(lines[0].get_xdata()) == [20 * 768, 40 * 768, 60 * 768]
    assert list(lines[1].get_xdata()) == [20 * 384, 40 * 384, 60 * 384]
    ax = comparison_figure(runs, x="time").axes[0]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[], [5.0, 10.0, 15.0]] * 2  # train rows have no time
    assert ax.get_xlabel() == "elapsed time (s)"


def test_tokens_axis_without_a_saved_state_is_a_clear_error(tmp_path):
    with pytest.raises(ScratchGPTError, match="--x tokens needs .*train_state.json"):
        comparison_figure([read_run(write_run(tmp_path / "run"))], x="tokens")


def test_same_directory_names_fall_back_to_paths(tmp_path):
    runs = [read_run(write_run(tmp_path / "a" / "run")), read_run(write_run(tmp_path / "b" / "run"))]
    labels = [line.get_label() for line in comparison_figure(runs).axes[0].get_lines() if "val" in line.get_label()]
    assert labels == [f"{tmp_path / 'a' / 'run'} (val)", f"{tmp_path / 'b' / 'run'} (val)"]


def test_cli_plot_one_run_and_several(tmp_path, capsys, monkeypatch):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", 0.9)
    assert main(["plot", str(a)]) == 0
    assert png_size(a / "loss.png")[0] > 0
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(a), str(b), "--labels", "first", "second"]) == 0
    assert png_size(tmp_path / "comparison.png")[0] > 0
    assert main(["plot", str(a), str(b), "--x", "time", "--out", str(tmp_path / "figs" / "cmp.svg")]) == 0
    assert (tmp_path / "figs" / "cmp.svg").read_text().lstrip().startswith("<?xml")
    assert "wrote" in capsys.readouterr().out


def test_cli_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err and "scratchgpt train --out" in err


@pytest.mark.parametrize("args,message", [
    (["--out", "{tmp}/loss.png/x.png"], "cannot write"),        # a file where a folder should be
    (["--out", "{tmp}/loss.nope"], "cannot write"),              # a format matplotlib does not know
    (["--labels", "a", "b"], "one label per RUN"),
])
def test_cli_plot_bad_output_or_labels_is_one_line(tmp_path, capsys, args, message):
    run_dir = write_run(tmp_path / "run")
    plot_run(run_dir)
    args = [arg.replace("{tmp}", str(run_dir)) for arg in args]
    assert main(["plot", str(run_dir), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_plot_runs_api_writes_where_asked(tmp_path):
    out = plot_runs([write_run(tmp_path / "a"), write_run(tmp_path / "b")], tmp_path / "both.png", labels=["x", "y"])
    assert out == tmp_path / "both.png" and png_size(out)[1] > 0
