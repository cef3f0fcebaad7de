"""The Evaluate & Predict tab: `peftkit predict` (BLEU-4, ROUGE-1/2/L and the generated answers) and `peftkit eval`
(loss, perplexity) on a dataset, run as the command line runs them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from ..errors import PeftkitError
from . import form
from .locales import text
from .runs import start_command
from .widgets import Texts, component

KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "dataset_dir", "eval_dataset", "max_samples",
        "cutoff_len", "per_device_eval_batch_size", "max_new_tokens", "temperature", "top_p", "top_k",
        "repetition_penalty", "do_sample", "output_dir")


class EvalTab:
    def __init__(self, texts: Texts, output_root: str, dataset_dir: str, model: str | None) -> None:
        self.root = output_root
        fields = form.fields_by_name()
        self.inputs: dict[str, Any] = {}
        defaults = {"model_name_or_path": model or "smollm2-135m", "dataset_dir": dataset_dir,
                    "output_dir": str(Path(output_root) / "eval"), "max_samples": 20}
        with gr.Row():
            for name in KEYS:
                field = fields[name]
                kw: dict[str, Any] = {"elem_id": f"pk-eval-{name}", "min_width": 220}
                if name in defaults:
                    kw["value"] = defaults[name]
                if name == "eval_dataset":
                    comp = gr.Dropdown(choices=form.dataset_names(dataset_dir), value=[], multiselect=True,
                                       allow_custom_value=True, label="Eval dataset", **kw)
                else:
                    comp = component(field, **kw)
                self.inputs[name] = texts.field(comp, field)
        with gr.Row():
            self.btn_predict = texts.value(gr.Button(text("predict", "en"), variant="primary",
                                                     elem_id="pk-btn-predict"), "predict")
            self.btn_eval = texts.value(gr.Button(text("evaluate", "en"), elem_id="pk-btn-eval"), "evaluate")
        self.status = gr.Markdown("", elem_id="pk-eval-status")
        self.metrics = texts.label(gr.Dataframe(pd.DataFrame({"metric": [], "value": []}), label=text("metrics", "en"),
                                                elem_id="pk-eval-metrics", interactive=False), "metrics")
        self.predictions = texts.label(gr.Dataframe(pd.DataFrame({"prompt": [], "predict": [], "label": []}),
                                                    label=text("predictions", "en"), elem_id="pk-eval-predictions",
                                                    wrap=True, interactive=False,  # the answers in view, not scrolled
                                                    column_widths=["40%", "30%", "30%"]), "predictions")
        self.console = texts.label(gr.Textbox(label=text("console", "en"), lines=8, max_lines=20,
                                              elem_id="pk-eval-console", interactive=False), "console")

    def wire(self, lang: Any) -> None:
        values = [self.inputs[n] for n in KEYS]
        outputs = [self.status, self.metrics, self.predictions, self.console]
        self.btn_predict.click(lambda *a: (yield from self._run("predict", *a)), [*values, lang], outputs)
        self.btn_eval.click(lambda *a: (yield from self._run("eval", *a)), [*values, lang], outputs)

    def _run(self, command: str, *args: Any) -> Iterator[list[Any]]:
        *vals, lang = args
        values = dict(zip(KEYS, vals))
        values["eval_dataset"] = ",".join(values["eval_dataset"] or [])
        what = text("predict" if command == "predict" else "evaluate", lang)
        try:
            document = form.to_document(values)
        except PeftkitError as e:
            yield [f"⚠ {e}", gr.update(), gr.update(), ""]
            return
        job = start_command(command, document, self.root)
        while job.running:
            yield [text("eval_running", lang, what=what), gr.update(), gr.update(), job.console()[-20000:]]
            time.sleep(1.0)
        job.wait()
        console = job.console()
        if job.returncode != 0:
            yield [text("failed", lang, code=job.returncode), gr.update(), gr.update(), console[-20000:]]
            return
        out = Path(str(document.get("output_dir") or "saves/run"))
        name = "predict_results.json" if command == "predict" else "eval_results.json"
        results = json.loads((out / name).read_text(encoding="utf-8"))
        metrics = pd.DataFrame({"metric": list(results), "value": [round(float(v), 4) for v in results.values()]})
        predictions: Any = gr.update()
        if command == "predict":
            lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
            predictions = pd.DataFrame([json.loads(line) for line in lines if line.strip()])
        yield [text("eval_done", lang, what=what), metrics, predictions, console[-20000:]]
