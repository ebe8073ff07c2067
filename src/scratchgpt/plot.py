"""Loss curves from a run's metrics.jsonl: one run's loss.png, or several runs in one figure.

`train` appends a "train" row every 10 steps (loss, lr, tokens_per_second) and an "eval" row
at each evaluation (train and val estimates, lr, elapsed_seconds). Figures are drawn on a bare
matplotlib `Figure`, never pyplot: no display is needed and a notebook's backend is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ScratchGPTError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

X_AXES = ("step", "tokens", "time")
X_LABELS = {"step": "step", "tokens": "tokens seen", "time": "elapsed time (s)"}


@dataclass
class RunMetrics:
    """The rows of one run's metrics.jsonl, split by kind."""

    run_dir: Path
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def read_run(run_dir: str | Path) -> RunMetrics:
    """Read RUN/metrics.jsonl, skipping lines that do not parse (a crash can cut the last one short)."""
    run = RunMetrics(Path(run_dir))
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ScratchGPTError(f"{path} not found: RUN must be a run directory from `scratchgpt train --out`")
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            if row.get("kind") == "train" and "loss" in row:
                run.train_rows.append(row)
            elif row.get("kind") == "eval" and "val_loss" in row:
                run.eval_rows.append(row)
    return run


def tokens_per_step(run: RunMetrics) -> float:
    """Tokens one optimizer step consumed, from the counters saved in last/ (a constant batch assumed)."""
    path = run.run_dir / "last" / "train_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return state["tokens_seen"] / state["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError):
        raise ScratchGPTError(f"--x tokens needs {path} (saved at the run's first evaluation); "
                              "use --x step or --x time") from None


def _points(run: RunMetrics, rows: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x values, `key` values) of the rows that have both; train rows carry no time, so none under "time"."""
    scale = tokens_per_step(run) if x == "tokens" and rows else 1.0
    xs, ys = [], []
    for row in rows:
        x_value = row.get("elapsed_seconds") if x == "time" else row["step"] * scale
        if x_value is not None and key in row:
            xs.append(x_value)
            ys.append(row[key])
    return xs, ys


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise ScratchGPTError(f"the x axis must be one of {X_AXES}, got {x!r}")


def _new_axes() -> tuple[Figure, Axes]:
    # Imported here: matplotlib takes a while to import, and most commands never draw.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    return fig, fig.subplots()


def _finish(fig: Figure, ax: Axes, x: str, title: str) -> None:
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()


def run_figure(run: RunMetrics, x: str = "step", title: str | None = None) -> Figure:
    """One run: train loss per logged step (faint), the train and val estimates, the learning rate on the right."""
    _check_x(x)
    fig, ax = _new_axes()
    ax.plot(*_points(run, run.train_rows, "loss", x), color="C0", alpha=0.35, label="train (per step)")
    ax.plot(*_points(run, run.eval_rows, "train_loss", x), "o-", color="C0", label="train (estimate)")
    ax.plot(*_points(run, run.eval_rows, "val_loss", x), "o-", color="C1", label="val (estimate)")
    lr_rows = run.eval_rows if x == "time" else run.train_rows  # only evaluations record the time
    lr_axis = ax.twinx()
    lr_axis.plot(*_points(run, lr_rows, "lr", x), "--", color="grey", linewidth=1, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles, labels = ax.get_legend_handles_labels()
    lr_handles, lr_labels = lr_axis.get_legend_handles_labels()
    ax.legend(handles + lr_handles, labels + lr_labels)
    _finish(fig, ax, x, title or run.name)
    return fig


def comparison_figure(runs: Sequence[RunMetrics], x: str = "step", labels: Sequence[str] | None = None) -> Figure:
    """Several runs, one colour each: the val estimates labelled with the run's name, train loss per step faint."""
    _check_x(x)
    labels = list(labels) if labels else _run_labels(runs)
    fig, ax = _new_axes()
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        ax.plot(*_points(run, run.train_rows, "loss", x), color=f"C{i}", alpha=0.25, linewidth=1)
        ax.plot(*_points(run, run.eval_rows, "val_loss", x), "o-", color=f"C{i}", label=f"{label} (val)")
    ax.legend()
    _finish(fig, ax, x, "val loss (markers), train loss per step (faint)")
    return fig


def _run_labels(runs: Sequence[RunMetrics]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [run.name for run in runs]
    return names if len(set(names)) == len(names) else [str(run.run_dir) for run in runs]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (its suffix picks the format: .png, .svg, .pdf...) and return the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ScratchGPTError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # matplotlib's word for an unknown image format
        raise ScratchGPTError(f"cannot write {path}: {exc}") from None
    return path


def plot_run(run_dir: str | Path, out: str | Path | None = None, x: str = "step", title: str | None = None) -> Path:
    """Draw one run's curves to `out` (default RUN/loss.png) and return where they went."""
    run = read_run(run_dir)
    return save_figure(run_figure(run, x, title), out or run.run_dir / "loss.png")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, x: str = "step",
              labels: Sequence[str] | None = None) -> Path:
    """Overlay several runs' curves in one figure at `out` and return its path."""
    return save_figure(comparison_figure([read_run(r) for r in run_dirs], x, labels), out)
