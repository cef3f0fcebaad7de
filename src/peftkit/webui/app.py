"""`peftkit webui`: the tabs put together, the language switch, and a server that is private by default."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
from pathlib import Path
from typing import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402  (after the analytics switch, which gradio reads on import)

from ..errors import ConfigError  # noqa: E402
from .chat_tab import ChatTab  # noqa: E402
from .eval_tab import EvalTab  # noqa: E402
from .export_tab import ExportTab  # noqa: E402
from .locales import LANGUAGES, text  # noqa: E402
from .runs_tab import RunsTab  # noqa: E402
from .train_tab import TrainTab  # noqa: E402
from .widgets import Texts  # noqa: E402

# The browser's language decides the first one shown; the selector changes it.
BROWSER_LANGUAGE = "() => (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en'"
CSS = "#pk-data-preview mark { background: #fde68a; } #pk-data-preview pre { white-space: pre-wrap; }"


def build(output_root: str = "saves", dataset_dir: str = "data", model: str | None = None) -> gr.Blocks:
    """The whole UI. `output_root` holds the runs; `dataset_dir` and `model` fill the forms' first values."""
    texts = Texts()
    with gr.Blocks(title="peftkit") as demo:
        with gr.Row():
            texts.value(gr.Markdown(f"## {text('title', 'en')}"), "title", "## {}")
            lang = texts.label(gr.Dropdown(choices=[(v, k) for k, v in LANGUAGES.items()], value="en",
                                           label=text("language", "en"), elem_id="pk-language", scale=0,
                                           min_width=160), "language")
        with gr.Tabs():
            with _tab(texts, "train"):
                train = TrainTab(texts, output_root, dataset_dir, model)
            with _tab(texts, "runs"):
                runs = RunsTab(texts, output_root)
            with _tab(texts, "eval"):
                evaluate = EvalTab(texts, output_root, dataset_dir, model)
            with _tab(texts, "chat"):
                chat = ChatTab(texts, model)
            with _tab(texts, "export"):
                export = ExportTab(texts, output_root, model)
        train.wire(lang)
        runs.wire()
        evaluate.wire(lang)
        chat.wire(lang)
        export.wire(lang)
        lang.change(texts.updates, lang, texts.components())
        demo.load(None, None, lang, js=BROWSER_LANGUAGE)
    return demo


@contextlib.contextmanager
def _tab(texts: Texts, name: str) -> Iterator[None]:
    """A tab whose label follows the language (locales' `tab_<name>`), found by tests as #pk-tab-<name>."""
    with gr.Tab(text(f"tab_{name}", "en"), id=name, elem_id=f"pk-tab-{name}") as tab:
        texts.label(tab, f"tab_{name}")
        yield


def read_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """`--auth user:password`, or a file of such lines (blank lines and # comments skipped)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [spec]
    pairs = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            where = f"in {path}" if path.is_file() else "for --auth"
            raise ConfigError(f"'{line}' {where} is not user:password; write e.g. --auth admin:s3cret, or a file "
                              "with one user:password per line.")
        pairs.append((user, password))
    if not pairs:
        raise ConfigError(f"{path} holds no user:password line.")
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, output_root: str = "saves",
           dataset_dir: str = "data", model: str | None = None, block: bool = True) -> gr.Blocks:
    """Serve the UI on host:port (loopback by default); with `auth`, every page and API call needs a login."""
    users = read_auth(auth)
    if not is_loopback(host) and users is None:
        print(f"warning: peftkit webui listens on {host}, beyond this machine, without a login: anyone who can reach "
              f"port {port} can train, read and write files as you. Add --auth user:password.", file=sys.stderr)
    demo = build(output_root, dataset_dir, model)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, auth=users, share=False, inbrowser=False, show_error=True,
                prevent_thread_lock=not block, quiet=False, ssr_mode=False, css=CSS,
                auth_message="peftkit: sign in with the user and password given to --auth.")
    return demo
