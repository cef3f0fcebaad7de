"""The web UI's parts that need no browser: forms from the schema, YAML round trips, checks, progress, locks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from helpers import LLAMA_FACTORY_EXAMPLE, SHARED_DATA

from peftkit.config import TrainConfig
from peftkit.errors import ConfigError
from peftkit.io.outputs import LOCK_NAME, lock_output, output_in_use
from peftkit.webui import form
from peftkit.webui.app import is_loopback, read_auth
from peftkit.webui.runs import curves, find_runs, progress


def test_every_key_is_one_field_and_method_keys_show_for_their_method() -> None:
    names = [f.name for f in form.fields()]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig)) and len(set(names)) == len(names)
    by_name = form.fields_by_name()
    assert form.visible(by_name["lora_rank"], "lora", "sft") and not form.visible(by_name["lora_rank"], "ia3", "sft")
    assert form.visible(by_name["num_virtual_tokens"], "prefix_tuning", "sft")
    assert form.visible(by_name["learning_rate"], "ia3", "sft")
    assert by_name["bf16"].kind == "tristate" and by_name["packing"].kind == "tristate"
    assert by_name["do_sample"].kind == "checkbox"
    assert by_name["lr_scheduler_type"].kind == "choice" and by_name["lora_rank"].kind == "number"
    grouped = [f.name for g in form.TRAIN_GROUPS for f in form.group_fields(g)]
    assert "lora_rank" in grouped and "learning_rate" in grouped and "export_format" not in grouped


def test_hand_written_yaml_round_trips_unchanged(tmp_path) -> None:
    document = yaml.safe_load(LLAMA_FACTORY_EXAMPLE)
    document.update(lora_target=["q_proj", "v_proj"], lr_scheduler_kwargs={"num_cycles": 2}, bf16=True,
                    ddp_timeout=180000000)  # a list, a mapping, a tristate and a key the form does not show
    values = form.form_values(document)
    assert form.to_document(values, document) == document
    assert list(form.to_document(values, document)) == list(document)  # the file's own order too
    values["learning_rate"] = "2e-4"  # one edit changes one key
    edited = form.to_document(values, document)
    assert {k for k in document if edited[k] != document[k]} == {"learning_rate"}
    saved = tmp_path / "saved.yaml"
    saved.write_text(form.dump(edited))
    assert form.read_document(saved) == edited


def test_an_untouched_form_writes_only_what_differs_from_the_defaults() -> None:
    values = form.form_values({})
    assert form.to_document(values) == {}
    values.update(model_name_or_path="m", lora_rank=16, packing="true", bf16="false", dataset="identity")
    assert form.to_document(values) == {"model_name_or_path": "m", "lora_rank": 16, "packing": True, "bf16": False,
                                        "dataset": "identity"}
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs must be a mapping"):
        form.to_document({**values, "lr_scheduler_kwargs": "{unclosed"})


def test_checks_name_the_field(tmp_path) -> None:
    good = {"model_name_or_path": "smollm2-135m", "dataset_dir": SHARED_DATA, "dataset": "identity",
            "output_dir": str(tmp_path / "run")}
    assert form.check(good) == {}
    assert "does not exist" in form.check({**good, "dataset_dir": str(tmp_path / "nope")})["dataset_dir"]
    assert "identity_typo" in form.check({**good, "dataset": "identity_typo"})["dataset"]
    assert "does not exist" in form.check({**good, "model_name_or_path": str(tmp_path / "no_model")})[
        "model_name_or_path"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"")
    assert "holds an earlier run" in form.check(good)["output_dir"]
    assert "lora_rank" in form.check({**good, "output_dir": str(tmp_path / "other"), "lora_rank": 0})


def test_default_output_dirs_are_fresh_and_named_like_llama_factory(tmp_path) -> None:
    path = form.default_output_dir(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "lora")
    assert path.startswith(str(tmp_path / "SmolLM2-135M-Instruct" / "lora" / "train_20"))


def test_progress_from_the_bar_and_the_log() -> None:
    console = "loading\ntrain:  10%|#         | 2/20 [00:01<00:09, 2.0step/s]\ntrain:  25%|##5       | 5/20 [00:02<0"
    entries = [{"step": 4, "epoch": 0.2, "loss": 1.5, "learning_rate": 1e-4, "tokens_per_second": 300.0},
               {"step": 4, "eval_loss": 1.7}]
    p = progress(entries, console, elapsed=10.0)
    assert (p.step, p.total, p.loss, p.tokens_per_second) == (5, 20, 1.5, 300.0)
    assert p.eta_seconds == pytest.approx(10.0 / 3 * 15)  # the pace since the bar's first step (2)
    assert "step 5/20" in p.describe() and "ETA" in p.describe()
    assert curves(entries) == [{"step": 4, "loss": 1.5, "series": "train"}, {"step": 4, "loss": 1.7,
                                                                              "series": "eval"}]
    assert "starting" in progress([], "", None).describe()


def test_runs_are_found_under_the_root(tmp_path) -> None:
    for name, loss in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / "model" / "lora" / name
        (run / "checkpoint-2").mkdir(parents=True)
        (run / "trainer_log.jsonl").write_text(json.dumps({"step": 1, "loss": loss}) + "\n")
        (run / "train_config.json").write_text(json.dumps({"learning_rate": loss}))
    runs = find_runs(tmp_path)
    assert sorted(r.path.name for r in runs) == ["a", "b"]
    assert {r.config["learning_rate"] for r in runs} == {1.0, 2.0}


def test_one_training_run_per_output_dir(tmp_path) -> None:
    out = tmp_path / "run"
    with lock_output(out):
        assert output_in_use(out)
        with pytest.raises(ConfigError, match="in use by another training run"):
            with lock_output(out):
                pass
        script = textwrap.dedent(f"""
            from peftkit.io.outputs import lock_output
            from peftkit.errors import ConfigError
            try:
                with lock_output({str(out)!r}):
                    print("locked")
            except ConfigError as e:
                print(e)
        """)
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert "in use by another training run (pid" in other.stdout
    assert not output_in_use(out) and not (out / LOCK_NAME).exists()  # released and removed at the end


def test_auth_and_binding(tmp_path) -> None:
    assert read_auth("admin:s3cret") == [("admin", "s3cret")]
    users = tmp_path / "users"
    users.write_text("# who may log in\nalice:a1\n\nbob:b:2\n")
    assert read_auth(str(users)) == [("alice", "a1"), ("bob", "b:2")]
    with pytest.raises(ConfigError, match="not user:password"):
        read_auth("admin")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_binding_beyond_loopback_without_auth_warns(monkeypatch, capsys) -> None:
    from peftkit.webui import app

    monkeypatch.setattr(app, "build", lambda *a, **k: _Launched())
    app.launch("0.0.0.0", 7999, None, block=False)
    assert "without a login" in capsys.readouterr().err
    app.launch("127.0.0.1", 7999, None, block=False)
    assert "without a login" not in capsys.readouterr().err


class _Launched:
    def queue(self, **kw: object) -> None:
        pass

    def launch(self, **kw: object) -> None:
        pass


def test_every_key_has_chinese_label_and_help() -> None:
    from peftkit.webui.locales import KEYS_ZH

    missing = [f.name for f in form.fields() if f.name not in KEYS_ZH]
    assert not missing, f"no Chinese label and help for {missing}"
    empty = [name for name, (label, help) in KEYS_ZH.items() if not label.strip() or not help.strip()]
    assert not empty, f"empty Chinese label or help for {empty}"


def test_an_empty_optional_number_means_unset() -> None:
    """gradio's number box shows an empty value as 0; keys where null means "unset" take text instead."""
    by_name = form.fields_by_name()
    for key in ("max_samples", "save_total_limit", "lora_alpha", "quantization_bit", "temperature"):
        assert by_name[key].kind == "optional_number", key
        assert form.parsed(by_name[key], "") is None
    assert form.parsed(by_name["max_samples"], "20") == 20 and form.parsed(by_name["temperature"], "0.7") == 0.7
    with pytest.raises(ConfigError, match="max_samples"):
        form.parsed(by_name["max_samples"], "lots")
