"""The Train tab: the form for every key, dataset preview, and a `peftkit train` run to start, watch, abort, resume."""

from __future__ import annotations

import dataclasses
import functools
import statistics
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..config import TrainConfig
from ..data import TEMPLATES
from ..data.sources import split_names
from ..errors import PeftkitError
from ..io.atomic import write_text
from ..io.outputs import output_in_use
from ..methods import available_methods
from ..objectives import available_objectives
from . import form
from .locales import text
from .preview import preview_dataset
from .runs import Job, curves, latest_checkpoint, process_log, progress, read_log
from .widgets import EMPTY_CURVE, Texts, component, curve_colors, help_text


@dataclasses.dataclass
class TrainState:
    """What the server remembers between clicks: the run in progress (one at a time) and the last run's folder."""

    job: Job | None = None
    output_dir: str | None = None
    stopping: bool = False


class TrainTab:
    def __init__(self, texts: Texts, output_root: str, dataset_dir: str, model: str | None) -> None:
        self.texts, self.root = texts, output_root
        self.state = TrainState()
        self.fields = form.fields_by_name()
        self.inputs: dict[str, Any] = {}
        self.defaults = {"dataset_dir": dataset_dir, "model_name_or_path": model or "smollm2-135m"}
        self._build()

    # --- layout ---
    def _field(self, name: str, **kw: Any) -> Any:
        field = self.fields[name]
        comp = self.texts.field(component(field, **kw), field)
        self.inputs[name] = comp
        return comp

    def _build(self) -> None:
        t = self.texts
        with gr.Row():
            self._field("model_name_or_path", choices=form.model_choices(),
                        value=self.defaults["model_name_or_path"], scale=3)
            self._field("finetuning_type", choices=available_methods())
            self._field("stage", choices=available_objectives())
            self._field("adapter_name_or_path", scale=2)
        with gr.Row():
            self._field("dataset_dir", value=self.defaults["dataset_dir"])
            names = form.dataset_names(self.defaults["dataset_dir"])
            self.inputs["dataset"] = t.field(gr.Dropdown(choices=names, value=[], multiselect=True,
                                                         allow_custom_value=True, elem_id="pk-dataset", scale=2,
                                                         label="Dataset (dataset)"), self.fields["dataset"])
            self._field("template", choices=["", *sorted(TEMPLATES)])
        with gr.Row():
            # a callable value runs on each page load: a fresh folder, never the one a finished run now holds
            fresh = functools.partial(self._fresh_output_dir, self.defaults["model_name_or_path"], "lora")
            self._field("output_dir", value=fresh, scale=4)
            self.new_dir = t.value(gr.Button(text("new_output_dir", "en"), elem_id="pk-btn-new-dir", scale=1),
                                   "new_output_dir")
        self.accordions = {}
        for group in form.TRAIN_GROUPS:
            with gr.Accordion(text(f"group_{group}", "en"), open=group == "basic",
                              elem_id=f"pk-group-{group}") as acc:
                t.label(acc, f"group_{group}")
                members = form.group_fields(group)
                empty = {"distributed": "no_distributed", "rlhf": "no_stage_keys"}.get(group)
                if empty and not members:  # a note rather than an empty accordion
                    t.value(gr.Markdown(text(empty, "en")), empty)
                with gr.Row(equal_height=False):
                    for field in members:
                        self._field(field.name, visible=form.visible(field, "lora", "sft"), min_width=220)
            self.accordions[group] = acc
        with gr.Row():
            self.btn_preview_data = t.value(gr.Button(text("preview_dataset", "en"), elem_id="pk-btn-preview-data"),
                                            "preview_dataset")
            self.btn_preview_cmd = t.value(gr.Button(text("preview_command", "en"), elem_id="pk-btn-preview-cmd"),
                                           "preview_command")
            self.config_path = t.label(gr.Textbox(label=text("config_path", "en"), elem_id="pk-config-path",
                                                  scale=2), "config_path")
            self.btn_save = t.value(gr.Button(text("save_args", "en"), elem_id="pk-btn-save"), "save_args")
            self.btn_load = t.value(gr.Button(text("load_args", "en"), elem_id="pk-btn-load"), "load_args")
        with gr.Row():
            self.btn_start = t.value(gr.Button(text("start", "en"), variant="primary", elem_id="pk-btn-start"),
                                     "start")
            self.btn_abort = t.value(gr.Button(text("abort", "en"), variant="stop", elem_id="pk-btn-abort"), "abort")
            self.btn_resume = t.value(gr.Button(text("resume", "en"), elem_id="pk-btn-resume"), "resume")
        self.status = gr.Markdown(text("idle", "en"), elem_id="pk-status")
        self.data_summary = gr.Markdown("", elem_id="pk-data-summary")
        self.data_rows = gr.HTML("", elem_id="pk-data-preview")
        with gr.Row():
            self.command = t.label(gr.Textbox(label=text("command", "en"), elem_id="pk-command", interactive=False),
                                   "command")
        self.yaml_text = t.label(gr.Code(label=text("yaml", "en"), language="yaml", elem_id="pk-yaml",
                                         interactive=False), "yaml")
        self.progress = gr.Markdown("", elem_id="pk-progress")
        # no fixed height: with one, the block's label pushes the legend (which curve is which) out of view
        self.plot = t.label(gr.LinePlot(EMPTY_CURVE, x="step", y="loss", color="series", elem_id="pk-loss-plot",
                                        label=text("loss_curve", "en")), "loss_curve")
        self.console = t.label(gr.Textbox(label=text("console", "en"), lines=12, max_lines=30, autoscroll=True,
                                          elem_id="pk-console", interactive=False), "console")
        self.timer = gr.Timer(1.0, active=False)
        self.loaded = gr.State({})  # the YAML document last loaded, so saving keeps it as written
        self.lang = gr.State("en")

    # --- events ---
    def wire(self, lang: Any) -> None:
        names = list(self.inputs)
        values = [self.inputs[n] for n in names]
        self.inputs["finetuning_type"].change(self._visibility, [self.inputs["finetuning_type"],
                                                                 self.inputs["stage"]], self._scoped())
        self.inputs["stage"].change(self._visibility, [self.inputs["finetuning_type"], self.inputs["stage"]],
                                    self._scoped())
        self.inputs["dataset_dir"].change(lambda d: gr.update(choices=form.dataset_names(d)),
                                          self.inputs["dataset_dir"], self.inputs["dataset"])
        self.new_dir.click(lambda m, f: self._fresh_output_dir(m, f),
                           [self.inputs["model_name_or_path"], self.inputs["finetuning_type"]],
                           self.inputs["output_dir"])

        def collect(*args: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
            *vals, loaded, language = args
            return dict(zip(names, vals)), language, loaded

        infos = [self.inputs[n] for n in names]
        self.btn_preview_cmd.click(lambda *a: self._preview_command(*collect(*a)), [*values, self.loaded, lang],
                                   [self.command, self.yaml_text, self.status, *infos])
        self.btn_preview_data.click(lambda *a: self._preview_data(*collect(*a)), [*values, self.loaded, lang],
                                    [self.data_summary, self.data_rows, self.status, *infos])
        self.btn_save.click(lambda *a: self._save(*a), [self.config_path, *values, self.loaded, lang],
                            [self.status, self.loaded, *infos])
        self.btn_load.click(self._load, [self.config_path, lang], [self.status, self.loaded, *values])
        self.btn_start.click(lambda *a: self._start(*collect(*a), resume=False), [*values, self.loaded, lang],
                             [self.status, self.command, self.yaml_text, self.timer, *infos])
        self.btn_resume.click(lambda *a: self._start(*collect(*a), resume=True), [*values, self.loaded, lang],
                              [self.status, self.command, self.yaml_text, self.timer, *infos])
        self.btn_abort.click(self._abort, [lang], [self.status])
        self.timer.tick(self._tick, [lang, self.inputs["model_name_or_path"], self.inputs["finetuning_type"]],
                        [self.status, self.progress, self.plot, self.console, self.timer, self.inputs["output_dir"]],
                        show_progress="hidden").then(curve_colors, self.plot, self.plot, show_progress="hidden")

    def _scoped(self) -> list[Any]:
        return [self.inputs[f.name] for f in form.fields() if f.scope != "run"]

    def _visibility(self, method: str, stage: str) -> list[Any]:
        return [gr.update(visible=form.visible(f, method, stage)) for f in form.fields() if f.scope != "run"]

    def _fresh_output_dir(self, model: str | None, method: str | None) -> str:
        return form.default_output_dir(self.root, model, method or "lora")

    def _document(self, values: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        values["dataset"] = ",".join(values.get("dataset") or [])  # LLaMA-Factory's spelling: "a,b"
        return form.to_document(values, loaded)

    def _infos(self, problems: dict[str, str], lang: str) -> list[Any]:
        """Each field's help, or its problem in its place (the message beside the field)."""
        return [gr.update(info=f"⚠ {problems[n]}" if n in problems else help_text(self.fields[n], lang))
                for n in self.inputs]

    def _checked(self, values: dict[str, Any], lang: str, loaded: dict[str, Any],
                 resume: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
        try:
            document = self._document(values, loaded)
        except PeftkitError as e:
            return {}, {"_form": str(e)}
        if resume:
            document["resume_from_checkpoint"] = True
        return document, form.check(document, resume=resume)

    def _problem_status(self, problems: dict[str, str], lang: str) -> str:
        shown = [n for n in problems if n in self.inputs]
        others = [m for n, m in problems.items() if n not in self.inputs]
        return "⚠ " + " ".join([text("fix_fields", lang, fields=", ".join(shown))] if shown else []) + " ".join(
            others)

    def _preview_command(self, values: dict[str, Any], lang: str, loaded: dict[str, Any]) -> list[Any]:
        document, problems = self._checked(values, lang, loaded)
        path = Path(str(document.get("output_dir", "saves/run"))) / form.CONFIG_NAME
        status = self._problem_status(problems, lang) if problems else text("idle", lang)
        return [" ".join(form.train_command(path)), form.dump(document), status, *self._infos(problems, lang)]

    def _preview_data(self, values: dict[str, Any], lang: str, loaded: dict[str, Any]) -> list[Any]:
        document, problems = self._checked(values, lang, loaded)
        problems.pop("output_dir", None)  # a preview writes nothing
        if problems:
            return ["", "", self._problem_status(problems, lang), *self._infos(problems, lang)]
        try:
            p = preview_dataset(TrainConfig.from_dict({**document, "do_train": False}))
        except PeftkitError as e:
            return ["", "", f"⚠ {e}", *self._infos({}, lang)]
        lengths = p.lengths or [0]
        summary = text("rows", lang, rows=p.rows, min=min(lengths), mean=statistics.mean(lengths), max=max(lengths),
                       cut=p.over_cutoff, cutoff=p.cutoff_len)
        return [summary, p.html, text("idle", lang), *self._infos({}, lang)]

    def _save(self, path: str, *args: Any) -> list[Any]:
        *vals, loaded, lang = args
        values = dict(zip(self.inputs, vals))
        if not path:
            return [f"⚠ {text('config_path', lang)}?", loaded, *self._infos({}, lang)]
        try:
            document = self._document(values, loaded)
        except PeftkitError as e:
            return [f"⚠ {e}", loaded, *self._infos({}, lang)]
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(target, form.dump(document))
        return [text("saved_to", lang, path=target), document, *self._infos({}, lang)]

    def _load(self, path: str, lang: str) -> list[Any]:
        try:
            document = form.read_document(path)
        except PeftkitError as e:
            return [f"⚠ {e}", gr.update(), *[gr.update() for _ in self.inputs]]
        shown = form.form_values(document)
        updates = []
        for name in self.inputs:
            value = shown[name]
            if name == "dataset":
                value = split_names(document.get("dataset"))
                updates.append(gr.update(value=value, choices=sorted({*form.dataset_names(
                    document.get("dataset_dir", "data")), *value})))
                continue
            updates.append(gr.update(value=value))
        return [text("loaded_from", lang, path=path), document, *updates]

    def _start(self, values: dict[str, Any], lang: str, loaded: dict[str, Any], *, resume: bool) -> list[Any]:
        keep = [gr.update(), gr.update(), gr.update()]
        if self.state.job is not None and self.state.job.running:
            return [text("busy", lang), *keep, *self._infos({}, lang)]
        if resume:
            values = {**values, "output_dir": self.state.output_dir or values["output_dir"]}
            if latest_checkpoint(values["output_dir"]) is None:
                return [text("no_checkpoint", lang, path=values["output_dir"]), *keep, *self._infos({}, lang)]
        document, problems = self._checked(values, lang, loaded, resume=resume)
        out = str(document.get("output_dir", ""))
        if out and output_in_use(out):
            problems["output_dir"] = f"'{out}' is in use by another training run."
        if problems:
            return [self._problem_status(problems, lang), *keep, *self._infos(problems, lang)]
        config = Path(out) / form.CONFIG_NAME
        config.parent.mkdir(parents=True, exist_ok=True)
        write_text(config, form.dump(document))
        command = form.train_command(config)
        self.state = TrainState(Job(command, process_log(out)), out)
        return [text("running", lang, progress="…"), " ".join(command), form.dump(document),
                gr.Timer(active=True), *self._infos({}, lang)]

    def _abort(self, lang: str) -> str:
        job = self.state.job
        if job is None or not job.running:
            return text("nothing_to_abort", lang)
        self.state.stopping = True
        job.stop()
        return self._final_status(lang)

    def _final_status(self, lang: str) -> str:
        job, out = self.state.job, self.state.output_dir
        assert job is not None and out is not None
        code = job.returncode
        if code == 0:
            return text("done", lang, path=out)
        if code == 130 or self.state.stopping:
            checkpoint = latest_checkpoint(out)
            if checkpoint is None:
                return text("aborted_nockpt", lang)
            return text("aborted", lang, step=checkpoint.name.rsplit("-", 1)[-1], checkpoint=checkpoint)
        return text("failed", lang, code=code)

    def _tick(self, lang: str, model: str, method: str) -> list[Any]:
        job, out = self.state.job, self.state.output_dir
        if job is None or out is None:
            return [gr.update(), gr.update(), gr.update(), gr.update(), gr.Timer(active=False), gr.update()]
        entries = read_log(out)
        console = job.console()
        p = progress(entries, console, job.elapsed)
        rows = curves(entries)
        plot = pd.DataFrame(rows) if rows else EMPTY_CURVE
        shown_console = "\n".join(line for line in console.splitlines() if line.strip())[-20000:]
        if job.running:
            return [text("running", lang, progress=p.describe()), p.describe(), plot, shown_console, gr.update(),
                    gr.update()]
        status = self._final_status(lang)
        fresh = self._fresh_output_dir(model, method) if job.returncode == 0 else gr.update()
        return [status, p.describe(), plot, shown_console, gr.Timer(active=False), fresh]
