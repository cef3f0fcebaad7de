"""The command line: export of a merged model, env, and one-line errors."""

from __future__ import annotations

import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from peftkit import LoraConfig, TunedModel
from peftkit.cli import main


def save_word_tokenizer(folder) -> None:
    """The tiny model has no tokenizer of its own; export needs one to copy."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            eos_token="<unk>").save_pretrained(folder)


def test_export_merged_reloads_in_transformers(tmp_path, input_ids, capsys) -> None:
    base_dir, adapter_dir, export_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama().save_pretrained(base_dir)
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.2)
    tuned.eval()
    with torch.no_grad():
        expected = tuned(input_ids=input_ids).logits
    tuned.save(adapter_dir)
    save_word_tokenizer(base_dir)

    args = [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}", f"export_dir={export_dir}",
            "export_size=1"]
    assert main(["export", *args]) == 0
    merged = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        assert (merged(input_ids=input_ids).logits - expected).abs().max() <= 1e-5
    assert (export_dir / "tokenizer.json").is_file() and (export_dir / "generation_config.json").is_file()

    # an existing export is not overwritten without overwrite_output_dir
    assert main(["export", *args]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and "Traceback" not in err
    assert main(["export", *args, "overwrite_output_dir=true"]) == 0


def test_errors_print_one_line(tmp_path, capsys) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.yaml" in err and len(err.splitlines()) == 1
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: x\ndataset: identity\nlearning_rat: 1e-4\n")
    assert main(["train", str(cfg)]) == 1
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err


def test_env(capsys) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "PEFTKIT_HOME" in out


def test_export_refuses_tensors_the_config_cannot_hold(tmp_path, capsys) -> None:
    """SSF merged into Llama's bias-free linears creates biases that LlamaConfig (attention_bias=False) would drop."""
    from peftkit.methods.ssf import SsfConfig

    base_dir, adapter_dir, export_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama().save_pretrained(base_dir)
    save_word_tokenizer(base_dir)
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(base_dir), SsfConfig(target_modules=["o_proj"]))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.2)
    tuned.save(adapter_dir)
    args = [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}", f"export_dir={export_dir}"]
    assert main(["export", *args]) == 1
    err = capsys.readouterr().err
    assert "o_proj.bias" in err and "would drop them" in err and "Traceback" not in err
    assert not export_dir.exists()  # nothing half-written


def test_chat_and_api_refuse_bad_settings_before_loading_a_model(monkeypatch, capsys) -> None:
    import peftkit.cli
    import peftkit.models

    def no_loading(*_, **__):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(peftkit.cli, "_load_chat_model", no_loading)
    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", no_loading)
    cases = [(["chat", "--temperature", "-1"], "temperature"), (["chat", "--max-new-tokens", "0"], "max_new_tokens"),
             (["chat", "--top-p", "1.5"], "top_p"), (["chat", "--top-p", "-0.5"], "top_p"),
             (["api", "--port", "99999"], "--port"), (["api", "--port", "-1"], "--port")]
    for argv, name in cases:
        assert main([*argv, "--model", "m"]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name} must be") and len(err.splitlines()) == 1, (argv, err)
