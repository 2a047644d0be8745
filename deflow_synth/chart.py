"""The figure of an ``inspect`` report, drawn with Pillow: noise curves, spectra, correlations.

Top row: noise standard deviation against intensity, one panel per folder (and one for the
generated images minus their clean counterparts), on a shared scale. Bottom row: the residual
power spectra of all of them on one log scale, their colour correlation matrices, and the
summary numbers with the distance between the folders.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["report_figure"]

PANEL_WIDTH = 420
PANEL_HEIGHT = 300
# Room around each plot area for the title, tick labels and axis labels.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 18, 34, 46
FONT_SIZE, TITLE_SIZE = 13, 15
LEVELS = 255  # noise is drawn in 8-bit levels, easier to read than [0, 1] units

WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
CHANNEL_COLORS = {"R": (205, 40, 40), "G": (30, 150, 50), "B": (40, 80, 210)}
SERIES_COLORS = {"generated": (230, 120, 20), "real": (40, 90, 200), "paired": (110, 110, 110)}
SERIES_LABELS = {"generated": "generated", "real": "real", "paired": "generated - clean"}


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class _Axes:
    """A plot area in pixels and the data ranges it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of a data point."""
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        u = self.left + (x - x0) / (x1 - x0) * (self.right - self.left)
        v = self.bottom - (y - y0) / (y1 - y0) * (self.bottom - self.top)

        return u, v


def _panel_axes(column: int, row: int, x_range, y_range) -> _Axes:
    left, top = column * PANEL_WIDTH, row * PANEL_HEIGHT

    return _Axes(
        left + MARGIN_LEFT,
        top + MARGIN_TOP,
        left + PANEL_WIDTH - MARGIN_RIGHT,
        top + PANEL_HEIGHT - MARGIN_BOTTOM,
        x_range,
        y_range,
    )


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    raw_step = (high - low) / count
    magnitude = 10 ** np.floor(np.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = np.ceil(low / step - 1e-9) * step

    return [float(v) for v in np.arange(first, high + step * 1e-6, step)]


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) > 1e-12 else "0"


def _draw_axes(canvas: Image.Image, axes: _Axes, title: str, x_label: str, y_label: str) -> None:
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)

    for value in _nice_ticks(*axes.y_range):
        _, v = axes.point(axes.x_range[0], value)
        draw.line([(axes.left, v), (axes.right, v)], fill=GRID)
        draw.text((axes.left - 6, v), _tick_label(value), fill=BLACK, font=font, anchor="rm")
    for value in _nice_ticks(*axes.x_range):
        u, _ = axes.point(value, axes.y_range[0])
        draw.line([(u, axes.top), (u, axes.bottom)], fill=GRID)
        draw.text((u, axes.bottom + 5), _tick_label(value), fill=BLACK, font=font, anchor="mt")
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline=BLACK)

    centre = (axes.left + axes.right) / 2
    draw.text((centre, axes.top - 8), title, fill=BLACK, font=title_font, anchor="md")
    draw.text((centre, axes.bottom + 24), x_label, fill=BLACK, font=font, anchor="mt")
    _draw_vertical_text(canvas, (axes.left - 48, (axes.top + axes.bottom) / 2), y_label, font)


def _draw_vertical_text(canvas: Image.Image, centre, text: str, font) -> None:
    left, top, right, bottom = ImageDraw.Draw(canvas).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (right - left + 4, bottom - top + 4), WHITE)
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=BLACK, font=font)
    label = label.rotate(90, expand=True)

    canvas.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def _draw_curve(draw: ImageDraw.ImageDraw, axes: _Axes, xs, ys, color, width: int = 2) -> None:
    """A polyline with a dot per point, broken where a value is missing (None)."""
    run = []
    for x, y in [*zip(xs, ys), (None, None)]:
        if y is None:
            if len(run) > 1:
                draw.line(run, fill=color, width=width, joint="curve")
            run = []
            continue
        u, v = axes.point(x, y)
        run.append((u, v))
        draw.ellipse([u - 2, v - 2, u + 2, v + 2], fill=color)


def _draw_legend(
    draw: ImageDraw.ImageDraw, axes: _Axes, entries: list[tuple[str, tuple]], right: bool = False
) -> None:
    font = _font(FONT_SIZE)
    width = max(draw.textlength(label, font=font) for label, _ in entries) + 31
    x = axes.right - width - 8 if right else axes.left + 8
    for index, (label, color) in enumerate(entries):
        y = axes.top + 10 + 16 * index
        draw.line([(x, y), (x + 18, y)], fill=color, width=3)
        draw.text((x + 23, y), label, fill=BLACK, font=font, anchor="lm")


def _draw_noise_panel(
    canvas: Image.Image, column: int, name: str, summary: dict | None, y_max: float
) -> None:
    axes = _panel_axes(column, 0, (0.0, 1.0), (0.0, y_max))
    title = f"noise std: {SERIES_LABELS[name]}"
    draw = ImageDraw.Draw(canvas)
    _draw_axes(canvas, axes, title, "intensity", "std (8-bit levels)")
    if summary is None:
        centre = ((axes.left + axes.right) / 2, (axes.top + axes.bottom) / 2)
        message = "no clean counterparts (--clean)"
        draw.text(centre, message, fill=BLACK, font=_font(FONT_SIZE), anchor="mm")
        return

    for channel, (label, color) in enumerate(CHANNEL_COLORS.items()):
        levels = [
            None if row[channel] is None else row[channel] * LEVELS for row in summary["noise_std"]
        ]
        _draw_curve(draw, axes, summary["intensity_bins"], levels, color)
    _draw_legend(draw, axes, list(CHANNEL_COLORS.items()))


def _draw_spectrum_panel(canvas: Image.Image, series: dict[str, dict]) -> None:
    logs = {
        name: [None if p is None or p <= 0 else float(np.log10(p)) for p in summary["power"]]
        for name, summary in series.items()
    }
    values = [v for curve in logs.values() for v in curve if v is not None]
    low, high = (min(values), max(values)) if values else (-6.0, -2.0)
    pad = max(0.1, (high - low) * 0.08)
    axes = _panel_axes(0, 1, (0.0, 0.5), (low - pad, high + pad))

    draw = ImageDraw.Draw(canvas)
    _draw_axes(canvas, axes, "residual power spectrum", "frequency (cycles/pixel)", "log10 power")
    for name, summary in series.items():
        _draw_curve(draw, axes, summary["frequencies"], logs[name], SERIES_COLORS[name])
    _draw_legend(draw, axes, [(SERIES_LABELS[n], SERIES_COLORS[n]) for n in series], right=True)


def _correlation_color(value: float) -> tuple[int, int, int]:
    # White at 0, red towards +1, blue towards -1.
    strength = min(abs(value), 1.0)
    fade = int(255 * (1 - strength))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def _draw_matrices(canvas: Image.Image, series: dict[str, dict]) -> None:
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    left, top = PANEL_WIDTH, PANEL_HEIGHT
    draw.text(
        (left + PANEL_WIDTH / 2, top + MARGIN_TOP - 8),
        "residual colour correlation",
        fill=BLACK,
        font=title_font,
        anchor="md",
    )

    cell = 34
    for index, (name, summary) in enumerate(series.items()):
        x0 = left + 24 + index * (3 * cell + 30)
        y0 = top + MARGIN_TOP + 40
        draw.text(
            (x0 + 1.5 * cell, y0 - 8),
            SERIES_LABELS[name],
            fill=SERIES_COLORS[name],
            font=font,
            anchor="md",
        )
        for i, row in enumerate(summary["color_correlation"]):
            for j, value in enumerate(row):
                box = [x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell, y0 + (i + 1) * cell]
                shown = 0.0 if value is None else value
                draw.rectangle(box, fill=_correlation_color(shown), outline=BLACK)
                draw.text(
                    ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                    f"{shown:.2f}",
                    fill=BLACK,
                    font=_font(11),
                    anchor="mm",
                )
        for k, label in enumerate(CHANNEL_COLORS):
            draw.text(
                (x0 + (k + 0.5) * cell, y0 + 3 * cell + 4),
                label,
                fill=BLACK,
                font=font,
                anchor="mt",
            )
            draw.text((x0 - 4, y0 + (k + 0.5) * cell), label, fill=BLACK, font=font, anchor="rm")


def _format(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _draw_summary(canvas: Image.Image, series: dict[str, dict], distance: dict) -> None:
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    left, top = 2 * PANEL_WIDTH, PANEL_HEIGHT
    draw.text(
        (left + PANEL_WIDTH / 2, top + MARGIN_TOP - 8),
        "summary",
        fill=BLACK,
        font=title_font,
        anchor="md",
    )

    rows = [("", [SERIES_LABELS[n].replace("generated - clean", "gen-clean") for n in series])]
    rows.append(
        (
            "std R/G/B",
            ["/".join(_format(v, LEVELS, 1) for v in s["channel_std"]) for s in series.values()],
        )
    )
    for third in ("low", "mid", "high"):
        rows.append(
            (f"std {third}", [_format(s["intensity_std"][third], LEVELS) for s in series.values()])
        )
    rows.append(("high/low power", [_format(s["high_low_ratio"]) for s in series.values()]))
    rows.append(("block borders", [_format(s["block_ratio"]) for s in series.values()]))
    rows.append(("colour corr.", [_format(s["mean_color_correlation"]) for s in series.values()]))

    y = top + MARGIN_TOP + 10
    for label, cells in rows:
        draw.text((left + 12, y), label, fill=BLACK, font=font)
        for index, text in enumerate(cells):
            draw.text((left + 130 + 95 * index, y), text, fill=BLACK, font=font)
        y += 19

    y += 10
    parts = ", ".join(f"{k} {_format(distance[k])}" for k in ("noise", "spectrum", "color"))
    draw.text((left + 12, y), f"distance {_format(distance['total'])}", fill=BLACK, font=font)
    draw.text((left + 12, y + 19), f"({parts})", fill=BLACK, font=font)
    draw.text((left + 12, y + 44), "std in 8-bit levels", fill=(90, 90, 90), font=font)


def report_figure(report: dict) -> Image.Image:
    """The report's figure: 3 x 2 panels on a white RGB canvas.

    Arguments:
        report: a report from :func:`deflow_synth.report.build_report`.
    """
    series = {
        "generated": report["generated"]["estimated"],
        "real": report["real"]["estimated"],
    }
    if report["generated"]["paired"] is not None:
        series["paired"] = report["generated"]["paired"]

    canvas = Image.new("RGB", (3 * PANEL_WIDTH, 2 * PANEL_HEIGHT), WHITE)

    # The noise panels share one scale, so that the folders compare at a glance.
    levels = [v for s in series.values() for row in s["noise_std"] for v in row if v is not None]
    y_max = max(levels) * LEVELS * 1.15 if levels else 1.0
    for column, name in enumerate(("generated", "real", "paired")):
        _draw_noise_panel(canvas, column, name, series.get(name), y_max)

    _draw_spectrum_panel(canvas, series)
    _draw_matrices(canvas, series)
    _draw_summary(canvas, series, report["distance"])

    return canvas
