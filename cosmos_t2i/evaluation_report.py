"""evaluate_text2image.py's outputs: the table (markdown, CSV, JSON), a contact sheet per candidate, a plot per
metric against the iteration, and the pick. Every file is written aside and renamed into place."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .atomic import atomic_output

METRICS = ("dino", "clip_i", "clip_t", "drift")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "drift": "prior drift"}
COLUMNS = ("candidate", "iteration", "ema", "lora_scale", *METRICS, "seconds_per_image")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _cell(row[c]) for c in COLUMNS} for row in rows)
    return out.getvalue()


def write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def pick(rows: list[dict], max_drift: float) -> dict | None:
    """The row with the best DINO among those whose drift is at most `max_drift` (a row without a drift, i.e. no
    prior prompts were run, counts as within it)."""
    allowed = [r for r in rows if r["drift"] is None or r["drift"] <= max_drift]
    return max(allowed, key=lambda r: r["dino"]) if allowed else None


def contact_sheet(images: list[list], row_labels: list[str], column_labels: list[str], thumbnail: int):
    """A grid: one row per prompt (its text on the left), one column per seed, each image fitted in
    `thumbnail` x `thumbnail` pixels."""
    from PIL import Image, ImageDraw, ImageOps

    label_width, header = 320, 20
    width = label_width + thumbnail * len(column_labels)
    sheet = Image.new("RGB", (width, header + thumbnail * len(row_labels)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(column_labels):
        draw.text((label_width + c * thumbnail + 4, 4), text, fill="black")
    for r, (row, text) in enumerate(zip(images, row_labels)):
        top = header + r * thumbnail
        draw.multiline_text((4, top + 4), _wrap(text, 48), fill="black")
        for c, image in enumerate(row):
            small = ImageOps.contain(image, (thumbnail, thumbnail))  # scaled up or down to fit
            sheet.paste(small, (label_width + c * thumbnail + (thumbnail - small.width) // 2,
                                top + (thumbnail - small.height) // 2))
    return sheet


def write_contact_sheet(path: Path, folder: Path, jobs, prompts, seeds: list[int], thumbnail: int) -> Path:
    """The contact sheet of one candidate's images in `folder` (evaluation.Job file names)."""
    from PIL import Image

    files = {(job.prompt_index, job.seed): folder / job.file_name() for job in jobs}
    grid = [[Image.open(files[i, seed]) for seed in seeds] for i in range(len(prompts))]
    sheet = contact_sheet(grid, [p.text for p in prompts], [f"seed {s}" for s in seeds], thumbnail)
    with atomic_output(path) as tmp:
        sheet.save(tmp)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:6])


def _series_label(row: dict) -> str:
    label = "EMA" if row["ema"] else "weights"
    return label + (f", LoRA x{row['lora_scale']:g}" if row["lora_scale"] is not None else "")


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path:
    """`metric` against the iteration, one line per kind of candidate (weights / EMA, per LoRA scale), each starting
    from the base model at iteration 0."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    base = next(r for r in rows if r["is_base"])
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if not row["is_base"] and row["iteration"] is not None and row[metric] is not None:
            series.setdefault(_series_label(row), []).append((row["iteration"], row[metric]))
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items()):
        if base[metric] is not None:
            points = [(0, base[metric])] + points
        xs, ys = zip(*sorted(points))
        axes.plot(xs, ys, marker="o", label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iteration")
    axes.set_ylabel(LABELS[metric])
    axes.set_title(f"{LABELS[metric]} against the iteration")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


def write_report(output_dir: Path, rows: list[dict], settings: dict, max_drift: float) -> dict[str, list[Path]]:
    """metrics.md / .csv / .json and plots/<metric>.png; returns what was written, by kind."""
    chosen = pick(rows, max_drift)
    written = {"table": [
        write_text(output_dir / "metrics.md", markdown_table(rows)),
        write_text(output_dir / "metrics.csv", csv_table(rows)),
        write_text(output_dir / "metrics.json", json.dumps(
            {"settings": settings, "max_drift": max_drift, "pick": chosen["candidate"] if chosen else None,
             "candidates": rows}, indent=2) + "\n"),
    ]}
    if any(not r["is_base"] and r["iteration"] is not None for r in rows):
        written["plots"] = [plot_metric(rows, m, output_dir / "plots" / f"{m}.png") for m in METRICS
                            if any(r[m] is not None for r in rows)]
    return written
