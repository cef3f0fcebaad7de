"""Gradio components for config fields, and the registry that relabels every component when the language changes."""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr
import pandas as pd

from .form import Field, shown
from .locales import KEYS_ZH, text

# A loss plot's data before there is any. Typed columns: gradio takes the plot's field types from its first value, and
# an untyped empty "series" would be a number, so the curves sent later would never be drawn.
EMPTY_CURVE = pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                            "series": pd.Series(dtype="str")})
# vega's category colours, one per series in the order the series first appear
SERIES_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
                 "#bab0ac")


def curve_colors(plot: dict[str, Any] | None) -> Any:
    """A colour for each series a loss plot shows, sent (`.then`) after its data. gradio colours only the series it
    found when it last built the chart, and rebuilds it when a setting such as color_map changes, not when the data
    does: without this, a series is drawn without a colour, that is not at all."""
    if not plot or "series" not in plot.get("columns", []):
        return gr.update()
    at = plot["columns"].index("series")
    names = dict.fromkeys(row[at] for row in plot["data"])
    return gr.update(color_map={name: SERIES_COLORS[i % len(SERIES_COLORS)] for i, name in enumerate(names)})


def label(name: str, lang: str) -> str:
    if lang == "zh" and name in KEYS_ZH:
        return f"{KEYS_ZH[name][0]} ({name})"
    return f"{name.replace('_', ' ').capitalize()} ({name})"


def help_text(field: Field, lang: str) -> str:
    if lang == "zh" and field.name in KEYS_ZH:
        return KEYS_ZH[field.name][1]
    return field.setting.help


def component(field: Field, lang: str = "en", *, choices: list[str] | None = None, visible: bool = True,
              **kw: Any) -> gr.components.Component:
    """The widget for one key, showing its default; `elem_id` pk-<key> lets tests and CSS find it."""
    value = kw.pop("value", shown(field, field.setting.default))
    common = {"label": label(field.name, lang), "info": help_text(field, lang), "elem_id": f"pk-{field.name}",
              "visible": visible, **kw}
    kind = field.kind
    if choices is not None:
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **common)
    if kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if kind == "tristate":
        return gr.Dropdown(choices=["auto", "true", "false"], value=value, **common)
    if kind == "choice":
        return gr.Dropdown(choices=list(field.setting.choices), value=value, **common)
    if kind == "number":
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value, **common)


class Texts:
    """Every translatable component with how to word it; `updates(lang)` relabels them all at once."""

    def __init__(self) -> None:
        self.items: list[tuple[gr.components.Component, Callable[[str], dict[str, Any]]]] = []

    def field(self, comp: gr.components.Component, field: Field) -> gr.components.Component:
        self.items.append((comp, lambda lang: {"label": label(field.name, lang), "info": help_text(field, lang)}))
        return comp

    def label(self, comp: Any, key: str) -> Any:
        self.items.append((comp, lambda lang: {"label": text(key, lang)}))
        return comp

    def value(self, comp: Any, key: str, shape: str = "{}") -> Any:
        """A button's caption or a Markdown's text (`shape` wraps it, e.g. "## {}" for a heading)."""
        self.items.append((comp, lambda lang: {"value": shape.format(text(key, lang))}))
        return comp

    def components(self) -> list[Any]:
        return [c for c, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        return [gr.update(**word(lang)) for _, word in self.items]
