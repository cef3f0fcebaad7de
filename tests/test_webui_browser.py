"""The web UI in a real browser: `peftkit webui` started as a command on a free loopback port, driven by headless
Chromium through Playwright the way a person would (clicks, typing, dropdowns), on a random 2-layer Llama with
smollm2's tokenizer and LLaMA-Factory's demo data. Train, watch, abort, resume, chat, predict, evaluate, export; a
hand-written YAML loaded, saved and run; a field's error shown beside it; the language switch; the login.

Skipped when /usr/bin/chromium or playwright is missing (never `playwright install`: it downloads a browser).
PEFTKIT_SCREENSHOTS=<dir> also saves train.png (a run in progress, its curve drawn) and chat.png there."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import LLAMA_FACTORY_EXAMPLE, SHARED_DATA
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing: the web UI's browser tests drive the system's Chromium",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
expect = playwright.expect
# An assertion retries until it holds; Playwright gives up after 5 s by default, which a relabel of the whole page
# can exceed on 2 cores busy with other tests. A passing check returns as soon as it holds, so the wait costs nothing.
expect.set_options(timeout=30_000)

# The Train tab's run: 16 rows a step, so that a step takes a noticeable moment and Abort lands mid-run.
STEPS, SAVE_STEPS, ABORT_AFTER, EVAL_STEPS = 30, 4, 5, 10
LONG = 300_000  # ms: a training run or a command's subprocess on 2 busy cores


# --- the server and the browser ---
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """`peftkit webui ARGS` in a subprocess, on a free loopback port; its console goes to a file, shown on failure."""

    def __init__(self, workdir: Path, home: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"webui-{self.port}.log"
        env = {**os.environ, "PEFTKIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "peftkit", "webui", "--port", str(self.port), *args],
                                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"peftkit webui did not come up (exit {self.process.returncode}):\n{self.console()}")
            time.sleep(0.5)

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webui")


@pytest.fixture(scope="module")
def webui(workdir, smollm2_home, small_model_dir):  # noqa: F811
    server = WebUI(workdir, smollm2_home, "--output-root", str(workdir / "saves"), "--dataset-dir", SHARED_DATA,
                   "--model", str(small_model_dir))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


def open_page(browser, url: str, **context: object):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, **context)
    ctx.set_default_timeout(60_000)
    page = ctx.new_page()
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    page.goto(url)
    return page


@pytest.fixture
def page(browser, webui):
    page = open_page(browser, webui.url)
    page.locator("#pk-btn-start").wait_for()
    yield page
    page.context.close()


# --- what a person does ---
def field(page, elem_id: str):
    """The input of a form field (a text box's textarea, a number's or a dropdown's input)."""
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def type_into(page, elem_id: str, value: object) -> None:
    field(page, elem_id).fill(str(value))


def choose(page, elem_id: str, option: str) -> None:
    """Open a dropdown, click the option; Escape closes a multiselect's list."""
    field(page, elem_id).click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def open_groups(page, *groups: str) -> None:
    for group in groups:
        page.locator(f"#pk-group-{group} > button.label-wrap").click()
        page.locator(f"#pk-group-{group} [data-testid=accordion-content]").wait_for()
    page.wait_for_timeout(500)  # the fields just drawn settle before anything is typed into them


def click(page, elem_id: str) -> None:
    page.locator(f"#{elem_id}").click()


def text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def progress_reached(page, step: int) -> None:
    page.wait_for_function("""step => {
        const m = /step (\\d+)\\/\\d+/.exec(document.querySelector('#pk-progress').innerText);
        return m !== null && Number(m[1]) >= step;
    }""", arg=step, timeout=LONG)


def curves(page, elem_id: str = "pk-loss-plot") -> dict[str, dict[str, str]]:
    """A plot's lines by series: the SVG path and its colour (a line without one is not drawn)."""
    lines = page.locator(f"#{elem_id}").evaluate("""e => [...e.querySelectorAll('g.mark-line path')]
        .map(p => [p.getAttribute('aria-label') || '', p.getAttribute('d') || '', p.getAttribute('stroke') || ''])""")
    return {re.search(r"series: (.*)$", label).group(1): {"path": d, "color": color} for label, d, color in lines}


def curves_drawn(page, count: int, elem_id: str = "pk-loss-plot") -> dict[str, dict[str, str]]:
    """Wait until the plot draws at least `count` lines, each with a path and a colour."""
    page.wait_for_function("""([id, count]) => {
        const lines = [...document.querySelectorAll(`#${id} g.mark-line path`)];
        return lines.length >= count && lines.every(p => p.getAttribute('d') && p.getAttribute('stroke'));
    }""", arg=[elem_id, count], timeout=60_000)
    return curves(page, elem_id)


def legend(page, elem_id: str = "pk-loss-plot") -> list[str]:
    """The plot's legend entries a person can see: inside the plot's block, not clipped by it."""
    return page.evaluate("""id => {
        const block = document.getElementById(id).getBoundingClientRect();
        return [...document.querySelectorAll(`#${id} .role-legend-label text`)].filter(t => {
            const r = t.getBoundingClientRect();
            return r.height > 0 && r.top >= block.top && r.bottom <= block.bottom;
        }).map(t => t.textContent);
    }""", elem_id)


def screenshot(page, folder: Path, name: str, **kw: object) -> None:
    folder.mkdir(exist_ok=True)
    page.screenshot(path=folder / f"{name}.png", **kw)
    extra = os.environ.get("PEFTKIT_SCREENSHOTS")
    if extra and name in ("train", "chat"):
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / f"{name}.png", Path(extra) / f"{name}.png")


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_log(output_dir) if "loss" in e]


# --- the path, start to end ---
def test_train_abort_resume_then_chat_predict_evaluate_export(page, workdir, tmp_path,
                                                              small_model_dir) -> None:  # noqa: F811
    shots = tmp_path / "screenshots"
    expect(field(page, "pk-model_name_or_path")).to_have_value(str(small_model_dir))
    open_groups(page, "data", "extra", "evaluation", "output")
    choose(page, "pk-finetuning_type", "lora")
    choose(page, "pk-dataset", "identity")
    expect(page.locator("#pk-dataset .token")).to_have_text(["identity"])
    for key, value in {"cutoff_len": 128, "max_steps": STEPS, "per_device_train_batch_size": 4,
                       "gradient_accumulation_steps": 4, "learning_rate": "0.001", "logging_steps": 1,
                       "save_steps": SAVE_STEPS, "val_size": 8, "eval_steps": EVAL_STEPS}.items():
        type_into(page, f"pk-{key}", value)
    choose(page, "pk-eval_strategy", "steps")

    click(page, "pk-btn-preview-cmd")  # what will run, as a person checks it before starting
    expect(page.locator("#pk-yaml")).to_contain_text(f"max_steps: {STEPS}")
    yaml_text = page.locator("#pk-yaml .cm-content").inner_text()
    document = yaml.safe_load(yaml_text)
    assert {k: document.get(k) for k in ("finetuning_type", "dataset", "cutoff_len", "per_device_train_batch_size",
                                         "gradient_accumulation_steps", "logging_steps", "save_steps", "val_size",
                                         "eval_strategy", "eval_steps")} == {
        "finetuning_type": None, "dataset": "identity", "cutoff_len": 128, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "logging_steps": 1, "save_steps": SAVE_STEPS, "val_size": 8,
        "eval_strategy": "steps", "eval_steps": EVAL_STEPS}  # lora is the default, so not written
    assert "max_samples" not in document and "save_total_limit" not in document  # opened, untouched: unset

    click(page, "pk-btn-preview-data")
    identity = len(json.loads((Path(SHARED_DATA) / "identity.json").read_text(encoding="utf-8")))
    expect(page.locator("#pk-data-summary")).to_contain_text(f"{identity} rows", timeout=LONG)
    expect(page.locator("#pk-data-summary")).to_contain_text("longer than cutoff_len 128")
    assert page.locator("#pk-data-preview mark").count() >= 1  # the answers' tokens, highlighted
    assert "Hello! I am" in page.locator("#pk-data-preview mark").first.inner_text()
    screenshot(page, shots, "train-preview", full_page=True)

    out = Path(field(page, "pk-output_dir").input_value())
    assert out.parent.parent.parent == workdir / "saves" and not out.exists()
    click(page, "pk-btn-start")
    expect(page.locator("#pk-status")).to_contain_text("Training", timeout=30_000)
    progress_reached(page, 2)
    first = curves_drawn(page, 1)
    assert "train" in first, first  # the training loss (the evaluation's comes at step EVAL_STEPS)
    progress_reached(page, ABORT_AFTER)
    page.wait_for_function("d => document.querySelector('#pk-loss-plot g.mark-line path').getAttribute('d') !== d",
                           arg=first["train"]["path"], timeout=30_000)  # the curve grows as the log does
    assert re.search(rf"step \d+/{STEPS}", text(page, "pk-progress"))
    page.locator("#pk-progress").evaluate("e => e.scrollIntoView({block: 'start'})")
    screenshot(page, shots, "train")

    click(page, "pk-btn-abort")
    expect(page.locator("#pk-status")).to_contain_text("Aborted after step", timeout=LONG)
    status = text(page, "pk-status")
    step = int(re.search(r"Aborted after step (\d+)", status).group(1))
    assert ABORT_AFTER <= step < STEPS, status  # mid-run
    checkpoint = out / f"checkpoint-{step}"
    assert f"The checkpoint {checkpoint} is intact" in status and checkpoint.is_dir()
    assert (out / f"checkpoint-{SAVE_STEPS}").is_dir()  # save_steps' checkpoint, before the abort
    assert [s for s, _ in losses(out)] == list(range(1, step + 1))

    click(page, "pk-btn-resume")
    expect(page.locator("#pk-status")).to_contain_text("Finished", timeout=LONG)
    assert str(out) in text(page, "pk-status")
    expect(page.locator("#pk-progress")).to_contain_text(f"step {STEPS}/{STEPS}")
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))  # each step once, to max_steps
    assert (out / "adapter_model.safetensors").is_file()
    expect(field(page, "pk-output_dir")).not_to_have_value(str(out))  # the next run gets a fresh folder
    assert [e["step"] for e in read_log(out) if "eval_loss" in e] == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))
    drawn = curves_drawn(page, 2)  # the evaluation's curve, new since the resume, is drawn in a colour of its own
    assert set(drawn) == {"train", "eval"} and drawn["train"]["color"] != drawn["eval"]["color"], drawn
    assert sorted(legend(page)) == ["eval", "train"]  # which curve is which
    screenshot(page, shots, "train-finished", full_page=True)

    tab(page, "Runs")
    click(page, "pk-btn-runs-refresh")
    choose(page, "pk-runs", str(out))
    expect(page.locator("#pk-run-results")).to_contain_text(f'"train_steps": {STEPS}')
    series = {f"{out.name} train", f"{out.name} eval"}
    assert set(curves_drawn(page, 2, "pk-runs-plot")) == series and set(legend(page, "pk-runs-plot")) == series
    screenshot(page, shots, "runs")

    tab(page, "Chat")
    expect(field(page, "pk-chat-model")).to_have_value(str(small_model_dir))
    type_into(page, "pk-chat-adapters", out)
    type_into(page, "pk-chat-max_new_tokens", 12)
    click(page, "pk-btn-chat-load")
    expect(page.locator("#pk-chat-info")).to_contain_text(f"Loaded {small_model_dir} + {out}")
    page.evaluate("""() => {  // every text the answer's bubble shows, in order
        window.pkAnswers = [];
        const root = document.querySelector('#pk-chat-tuned');
        new MutationObserver(() => {
            const bubble = [...root.querySelectorAll('[data-testid=bot]')].pop();
            const seen = window.pkAnswers;
            if (bubble && seen[seen.length - 1] !== bubble.innerText) seen.push(bubble.innerText);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    type_into(page, "pk-chat-message", "Who are you?")
    click(page, "pk-btn-chat-send")
    expect(page.locator("#pk-chat-tuned [data-testid=user]")).to_have_text("Who are you?")
    answer = page.locator("#pk-chat-tuned [data-testid=bot]")
    expect(answer).not_to_be_empty(timeout=60_000)
    expect(field(page, "pk-chat-message")).to_have_value("")
    settled = ""
    while settled != answer.inner_text():  # the stream has ended once the bubble stops changing
        settled = answer.inner_text()
        page.wait_for_timeout(1500)
    seen = [t for t in page.evaluate("window.pkAnswers") if t.strip()]
    assert len(seen) >= 2 and seen[-1] == settled, seen  # streamed: the answer grew in place
    screenshot(page, shots, "chat")

    tab(page, "Evaluate & Predict")
    expect(field(page, "pk-eval-model_name_or_path")).to_have_value(str(small_model_dir))
    type_into(page, "pk-eval-adapter_name_or_path", out)
    choose(page, "pk-eval-eval_dataset", "identity")
    for key, value in {"max_samples": 4, "cutoff_len": 128, "max_new_tokens": 8}.items():
        type_into(page, f"pk-eval-{key}", value)
    evaluated = workdir / "saves" / "eval"
    expect(field(page, "pk-eval-output_dir")).to_have_value(str(evaluated))
    click(page, "pk-btn-predict")
    expect(page.locator("#pk-eval-status")).to_contain_text("Predict finished.", timeout=LONG)
    metrics = text(page, "pk-eval-metrics")
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert key in metrics
    results = json.loads((evaluated / "predict_results.json").read_text())
    assert f"{round(results['predict_bleu-4'], 4):g}" in metrics
    rows = [json.loads(line) for line in (evaluated / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    table = page.locator("#pk-eval-predictions")
    for row in rows:
        expect(table).to_contain_text(row["predict"].strip()[:20])
    expect(table).to_contain_text("Who are you?")
    right = table.bounding_box()["x"] + table.bounding_box()["width"]
    for column in ("predict", "label"):  # in view beside the prompt, not scrolled off to the right
        head = table.locator("th", has_text=column).first.bounding_box()
        assert head["x"] + head["width"] <= right + 1, (column, head, right)
    screenshot(page, shots, "eval-predict", full_page=True)
    click(page, "pk-btn-eval")
    expect(page.locator("#pk-eval-status")).to_contain_text("Evaluate finished.", timeout=LONG)
    metrics = text(page, "pk-eval-metrics")
    assert "eval_loss" in metrics and "eval_perplexity" in metrics
    results = json.loads((evaluated / "eval_results.json").read_text())
    assert f"{round(results['eval_loss'], 4):g}" in metrics
    screenshot(page, shots, "eval", full_page=True)

    tab(page, "Export")
    type_into(page, "pk-export-adapter_name_or_path", out)
    choose(page, "pk-export-export_format", "hf")
    click(page, "pk-btn-export")
    expect(page.locator("#pk-export-status")).to_contain_text("Exported to", timeout=LONG)
    exported = workdir / "saves" / "export"
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    assert {"config.json", "model.safetensors"} <= set(files)
    assert field(page, "pk-export-files").input_value().splitlines() == files
    screenshot(page, shots, "export", full_page=True)
    assert page.js_errors == []


# --- a hand-written YAML: loaded, saved unchanged, and run as the command line runs it ---
def test_hand_written_yaml_round_trips_and_trains_as_the_cli_does(page, workdir, smollm2_home,
                                                                  small_model_dir, tmp_path) -> None:  # noqa: F811
    hand = tmp_path / "llama3_lora_sft.yaml"
    ui_run, cli_run = tmp_path / "ui_run", tmp_path / "cli_run"
    edits = {"meta-llama/Meta-Llama-3-8B-Instruct": str(small_model_dir),
             "dataset: identity,alpaca_en_demo": f"dataset: identity\ndataset_dir: {SHARED_DATA}",
             "cutoff_len: 2048": "cutoff_len: 128", "max_samples: 1000": "max_samples: 16",
             "saves/llama3-8b/lora/sft": str(ui_run), "logging_steps: 10": "logging_steps: 1",
             "gradient_accumulation_steps: 8": "gradient_accumulation_steps: 2",
             "per_device_train_batch_size: 1": "per_device_train_batch_size: 2",
             "num_train_epochs: 3.0": "num_train_epochs: 3.0\nmax_steps: 6"}
    written = LLAMA_FACTORY_EXAMPLE
    for old, new in edits.items():
        assert old in written
        written = written.replace(old, new)
    hand.write_text(written)

    type_into(page, "pk-config-path", hand)
    click(page, "pk-btn-load")
    expect(page.locator("#pk-status")).to_contain_text(f"Loaded {hand}")
    expect(field(page, "pk-output_dir")).to_have_value(str(ui_run))
    expect(field(page, "pk-dataset_dir")).to_have_value(SHARED_DATA)
    expect(page.locator("#pk-dataset .token")).to_have_text(["identity"])
    expect(field(page, "pk-max_steps")).to_have_value("6")
    expect(field(page, "pk-bf16")).to_have_value("true")

    saved = tmp_path / "saved" / "again.yaml"
    type_into(page, "pk-config-path", saved)
    click(page, "pk-btn-save")
    expect(page.locator("#pk-status")).to_contain_text(f"Saved {saved}")
    assert yaml.safe_load(saved.read_text()) == yaml.safe_load(written)

    env = {**os.environ, "PEFTKIT_HOME": str(smollm2_home), "HF_HUB_OFFLINE": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "peftkit", "train", str(hand), f"output_dir={cli_run}"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    click(page, "pk-btn-start")
    expect(page.locator("#pk-status")).to_contain_text("Finished", timeout=LONG)
    console, _ = cli.communicate(timeout=LONG / 1000)
    assert cli.returncode == 0, console
    assert yaml.safe_load((ui_run / "training_args.yaml").read_text()) == yaml.safe_load(written)
    ui_losses = losses(ui_run)
    assert [s for s, _ in ui_losses] == list(range(1, 7))
    assert ui_losses == losses(cli_run)


# --- errors beside their fields ---
def test_a_missing_dataset_dir_is_shown_beside_its_field_and_nothing_starts(page, workdir) -> None:
    choose(page, "pk-dataset", "identity")
    out = Path(field(page, "pk-output_dir").input_value())
    missing = workdir / "no_such_data"
    type_into(page, "pk-dataset_dir", missing)
    click(page, "pk-btn-start")
    beside = page.locator("#pk-dataset_dir")
    expect(beside).to_contain_text(f"⚠ The dataset directory '{missing}' does not exist.")
    expect(page.locator("#pk-status")).to_contain_text("Fix the marked settings first: dataset_dir.")
    assert "⚠" not in text(page, "pk-output_dir") and "⚠" not in text(page, "pk-model_name_or_path")
    page.wait_for_timeout(1500)  # a run would have made its folder and said so by now
    assert "Training" not in text(page, "pk-status") and not out.exists() and not missing.exists()

    type_into(page, "pk-dataset_dir", SHARED_DATA)  # fixed: the message goes, the help comes back
    click(page, "pk-btn-preview-cmd")
    expect(beside).not_to_contain_text("⚠")
    expect(page.locator("#pk-status")).to_have_text("Ready.")


# --- the language ---
def test_chinese_relabels_the_tabs_and_fields(page, browser, webui) -> None:
    choose(page, "pk-language", "中文")
    expect(page.get_by_role("tab", name="训练", exact=True)).to_be_visible()
    expect(page.get_by_role("tab", name="对话", exact=True)).to_be_visible()
    expect(page.locator("#pk-btn-start")).to_have_text("开始")
    expect(page.locator("#pk-learning_rate")).to_contain_text("学习率 (learning_rate)")
    choose(page, "pk-language", "English")
    expect(page.get_by_role("tab", name="Train", exact=True)).to_be_visible()

    chinese = open_page(browser, webui.url, locale="zh-CN")  # a Chinese browser starts in Chinese
    try:
        expect(chinese.get_by_role("tab", name="训练", exact=True)).to_be_visible()
        expect(field(chinese, "pk-language")).to_have_value("中文")
    finally:
        chinese.context.close()


# --- the login ---
def test_auth_refuses_the_api_without_a_login_and_admits_the_right_password(browser, workdir, smollm2_home,
                                                                            small_model_dir) -> None:  # noqa: F811
    server = WebUI(workdir, smollm2_home, "--auth", "alice:s3cret", "--output-root", str(workdir / "private"),
                   "--dataset-dir", SHARED_DATA, "--model", str(small_model_dir))
    try:
        for path in ("/config", "/gradio_api/info", "/gradio_api/queue/status"):
            response = httpx.get(server.url + path, timeout=10)
            assert response.status_code == 401 and "Not authenticated" in response.text, path
        join = httpx.post(server.url + "/gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                                       "session_hash": "x"}, timeout=10)
        assert join.status_code == 401

        page = open_page(browser, server.url)
        try:
            expect(page.get_by_text("peftkit: sign in with the user and password given to --auth.")).to_be_visible()
            assert page.locator("#pk-btn-start").count() == 0
            page.get_by_label("username").fill("alice")
            page.get_by_label("password").fill("wrong")
            page.get_by_role("button", name="Login").click()
            expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
            assert page.locator("#pk-btn-start").count() == 0
            page.get_by_label("username").fill("alice")  # the form empties itself after a failed try
            page.get_by_label("password").fill("s3cret")
            page.get_by_role("button", name="Login").click()
            expect(page.locator("#pk-btn-start")).to_be_visible()
            assert page.request.get(server.url + "/config").status == 200  # the session's cookie opens the API
        finally:
            page.context.close()
    finally:
        server.stop()
