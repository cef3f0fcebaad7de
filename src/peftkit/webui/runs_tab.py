"""The Runs tab: past runs under the output root, their settings and results, and their loss curves on one plot."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import pandas as pd

from .locales import text
from .runs import curves, find_runs, read_log
from .widgets import EMPTY_CURVE, Texts, curve_colors


class RunsTab:
    def __init__(self, texts: Texts, output_root: str) -> None:
        self.root = output_root
        with gr.Row():
            self.runs = texts.label(gr.Dropdown(choices=self._names(), value=[], multiselect=True, scale=4,
                                                label=text("runs", "en"), elem_id="pk-runs"), "runs")
            self.refresh = texts.value(gr.Button(text("refresh", "en"), elem_id="pk-btn-runs-refresh", scale=1),
                                       "refresh")
        # no fixed height: with one, the block's label pushes the legend (which curve is which) out of view
        self.plot = texts.label(gr.LinePlot(EMPTY_CURVE, x="step", y="loss", color="series",
                                            label=text("compare", "en"), elem_id="pk-runs-plot"), "compare")
        with gr.Row():
            self.config = texts.label(gr.Code(label=text("run_config", "en"), language="json",
                                              elem_id="pk-run-config", interactive=False), "run_config")
            self.results = texts.label(gr.Code(label=text("run_results", "en"), language="json",
                                               elem_id="pk-run-results", interactive=False), "run_results")

    def _names(self) -> list[str]:
        return [r.name for r in find_runs(self.root)]

    def wire(self) -> None:
        self.refresh.click(lambda: gr.update(choices=self._names()), None, self.runs)
        self.runs.change(self._show, self.runs, [self.plot, self.config, self.results]).then(
            curve_colors, self.plot, self.plot, show_progress="hidden")

    def _show(self, selected: list[str]) -> list[Any]:
        runs = {r.name: r for r in find_runs(self.root)}
        chosen = [runs[name] for name in selected or [] if name in runs]
        rows = []
        for run in chosen:
            label = run.path.name if len({r.path.name for r in chosen}) == len(chosen) else str(run.path)
            rows += [{**row, "series": f"{label} {row['series']}"} for row in curves(read_log(run.path))]
        plot = pd.DataFrame(rows) if rows else EMPTY_CURVE
        configs = {r.name: r.config for r in chosen}
        results = {r.name: r.results for r in chosen}
        one = len(chosen) == 1
        return [plot, json.dumps(next(iter(configs.values())) if one else configs, indent=2),
                json.dumps(next(iter(results.values())) if one else results, indent=2)]
