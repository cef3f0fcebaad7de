"""The Export tab: `peftkit export` to a merged HF folder, a GGUF file, a GGUF LoRA adapter or an Ollama model; shows
the files written and the `ollama create` command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..errors import PeftkitError
from . import form
from .locales import text
from .runs import start_command
from .widgets import Texts, component

KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "export_format", "export_dir", "export_size",
        "export_gguf_type", "ollama_system", "export_device", "export_legacy_format")


class ExportTab:
    def __init__(self, texts: Texts, output_root: str, model: str | None) -> None:
        self.root = output_root
        fields = form.fields_by_name()
        defaults = {"model_name_or_path": model or "smollm2-135m", "export_dir": str(Path(output_root) / "export")}
        self.inputs: dict[str, Any] = {}
        with gr.Row():
            for name in KEYS:
                kw: dict[str, Any] = {"elem_id": f"pk-export-{name}", "min_width": 220}
                if name in defaults:
                    kw["value"] = defaults[name]
                self.inputs[name] = texts.field(component(fields[name], **kw), fields[name])
        self.btn_export = texts.value(gr.Button(text("export", "en"), variant="primary", elem_id="pk-btn-export"),
                                      "export")
        self.status = gr.Markdown("", elem_id="pk-export-status")
        self.files = texts.label(gr.Textbox(label=text("export_files", "en"), lines=4, interactive=False,
                                            elem_id="pk-export-files"), "export_files")
        self.ollama = texts.label(gr.Textbox(label=text("ollama_create", "en"), interactive=False,
                                             elem_id="pk-export-ollama"), "ollama_create")
        self.console = texts.label(gr.Textbox(label=text("console", "en"), lines=6, max_lines=20, interactive=False,
                                              elem_id="pk-export-console"), "console")

    def wire(self, lang: Any) -> None:
        self.btn_export.click(lambda *a: (yield from self._export(*a)), [*(self.inputs[n] for n in KEYS), lang],
                              [self.status, self.files, self.ollama, self.console])

    def _export(self, *args: Any) -> Iterator[list[Any]]:
        *vals, lang = args
        try:
            document = form.to_document(dict(zip(KEYS, vals)))
        except PeftkitError as e:
            yield [f"⚠ {e}", "", "", ""]
            return
        job = start_command("export", document, self.root)
        while job.running:
            yield [text("eval_running", lang, what=text("export", lang)), "", "", job.console()[-20000:]]
            time.sleep(1.0)
        job.wait()
        console = job.console()
        if job.returncode != 0:
            yield [text("failed", lang, code=job.returncode), "", "", console[-20000:]]
            return
        out = Path(str(document["export_dir"]))
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
        ollama = next((line.strip() for line in console.splitlines() if "ollama create" in line), "")
        yield [text("export_done", lang, path=out), "\n".join(files), ollama, console[-20000:]]
