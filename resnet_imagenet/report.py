"""The training report: loss and accuracy curves and the per-class table, in one HTML page.

The KFP UI shows an HTML artifact inline, so a run can be judged without starting TensorBoard.
The curves are read from the TensorBoard event files that training and evaluation write under
``MODEL/logs/{train,validation}`` (local or gs://) and drawn with Pillow as PNG images embedded in
the page (``data:`` URIs: the page is one self-contained file). The numbers come from the
metrics JSON of ``resnet-imagenet evaluate``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from typing import Mapping, Sequence

from resnet_imagenet import storage

log = logging.getLogger(__name__)

Series = list[tuple[int, float]]

# (title, y label, [(run, tag, legend)]) for each chart; a chart without data is left out.
CHARTS = (
    ("Loss", "loss", [("train", "loss/total", "total"),
                      ("train", "loss/cross_entropy", "cross-entropy")]),
    ("Accuracy", "top-k accuracy", [("train", "train/top1", "train top-1"),
                                    ("validation", "validation/top1", "validation top-1"),
                                    ("validation", "validation/top5", "validation top-5")]),
    ("Learning rate", "learning rate", [("train", "learning_rate", "learning rate")]),
    ("Throughput", "images/s", [("train", "perf/images_per_second", "images/s")]),
)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189))


def read_scalars(logdir: str) -> dict[str, Series]:
    """Every scalar of the event files directly under ``logdir``: ``{tag: [(step, value)]}``.

    Both summary forms are read: TF1 ``simple_value`` and TF2 scalar tensors. A step written
    twice (training resumed from an earlier checkpoint) keeps its last value.
    """
    import tensorflow as tf

    values: dict[str, dict[int, float]] = {}
    for path in storage.glob(storage.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor") and value.metadata.plugin_data.plugin_name in (
                        "scalars", ""):
                    array = tf.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in "fiu":
                        continue
                    number = float(array.reshape(()))
                else:
                    continue
                values.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in values.items()}


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10_000 or abs(value) < 0.001:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def line_chart(series: Mapping[str, Series], title: str, y_label: str,
               width: int = 640, height: int = 360) -> bytes:
    """A line chart of one or more (step, value) series as PNG bytes."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 50, height - 45
    points = [p for s in series.values() for p in s]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = _ticks(min(xs), max(xs))
    y_ticks = _ticks(min(ys), max(ys))
    x0, x1 = x_ticks[0], max(x_ticks[-1], x_ticks[0] + 1)
    y0, y1 = y_ticks[0], y_ticks[-1] if y_ticks[-1] > y_ticks[0] else y_ticks[0] + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.text((width / 2, 12), title, fill="black", font=font, anchor="mt")
    for tick in y_ticks:
        _, y = px(x0, tick)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 6, y), _label(tick), fill="black", font=font, anchor="rm")
    for tick in x_ticks:
        x, _ = px(tick, y0)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), _label(tick), fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, height - 6), "step", fill="black", font=font, anchor="mb")
    draw.text((4, top - 12), y_label, fill="black", font=font, anchor="lm")

    for i, data in enumerate(series.values()):
        color = COLORS[i % len(COLORS)]
        line = [px(x, y) for x, y in data]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) < 30 else line[-1:]:  # dots where points are sparse
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    # The legend is a row between the title and the plot, where it never hides a curve.
    x = max(left, 24 + draw.textlength(y_label, font=font))
    for i, name in enumerate(series):
        draw.line([(x, 34), (x + 20, 34)], fill=COLORS[i % len(COLORS)], width=2)
        draw.text((x + 25, 34), name, fill="black", font=font, anchor="lm")
        x += 25 + draw.textlength(name, font=font) + 20

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(row.get(c, ''))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(model_dir: str, metrics: Mapping) -> str:
    """The report page for a model directory and its evaluation metrics."""
    runs = {run: read_scalars(storage.join(model_dir, "logs", run))
            for run in ("train", "validation")}
    charts = []
    for title, y_label, wanted in CHARTS:
        series = {legend: runs[run][tag] for run, tag, legend in wanted if runs[run].get(tag)}
        if series:
            png = base64.b64encode(line_chart(series, title, y_label)).decode()
            charts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
    if not charts:
        charts.append(f"<p>No TensorBoard scalars under {html.escape(model_dir)}/logs.</p>")

    summary = [{"metric": key, "value": metrics[key]}
               for key in ("top1", "top5", "images", "skipped_records", "step", "checkpoint")
               if key in metrics]
    summary += _training_counts(model_dir)
    per_class = sorted(metrics.get("per_class") or [],
                       key=lambda row: (row.get("top1", 0), str(row.get("label", ""))))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Training report</title>",
        "<style>body{font-family:sans-serif;margin:16px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{margin:4px}</style>",
        "</head><body>",
        "<h2>Evaluation</h2>", _table(summary),
        "<h2>Curves</h2>", "".join(charts),
        f"<p>Model directory: <code>{html.escape(model_dir)}</code> "
        f"(<code>tensorboard --logdir {html.escape(storage.join(model_dir, 'logs'))}</code>)</p>",
    ]
    if per_class:
        parts += ["<h2>Per class (worst first)</h2>", _table(per_class)]
    parts.append("</body></html>")
    return "\n".join(parts)


def _training_counts(model_dir: str) -> list[dict]:
    """The training run's unreadable records, from MODEL/train_summary.json (when written)."""
    try:
        trained = json.loads(storage.read_text(storage.join(model_dir, "train_summary.json")))
    except (FileNotFoundError, ValueError):
        return []
    return [{"metric": f"training {key.replace('_', ' ')}", "value": trained[key]}
            for key in ("skipped_records", "records_seen") if key in trained]


def write(model_dir: str, metrics_path: str, output: str) -> None:
    """Write the report of ``model_dir`` and the metrics JSON at ``metrics_path`` to ``output``."""
    metrics = json.loads(storage.read_text(metrics_path))
    storage.write_text(output, render(model_dir, metrics))
    log.info("training report written to %s", output)
