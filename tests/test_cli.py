"""The command line: export of a merged model (and its LLaMA-Factory keys), chat options, env, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)
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
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(base_dir),
                       LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
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


def test_a_command_runs_with_the_objects_made_before_it_frozen_and_gives_them_back(monkeypatch, capsys) -> None:
    """main leaves what exists before the command out of the cyclic collector's walks while it runs (faster loading
    and training), and gives it back after, also when the command fails: a process that runs many commands (the
    tests, a UI) must not keep the garbage cycles of earlier ones."""
    import gc

    import peftkit.cli as cli

    seen = []

    def record(args) -> None:
        seen.append(gc.get_freeze_count())
        raise cli.PeftkitError("stopped")

    monkeypatch.setattr(cli, "cmd_env", record)
    gc.unfreeze()
    assert main(["env"]) == 1  # the parser, built inside main, picks up the patched command
    assert seen and seen[0] > 1000
    assert gc.get_freeze_count() == 0
    assert "stopped" in capsys.readouterr().err


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
    for module in (peftkit.models, peftkit.cli):  # where it is defined, and where `peftkit api` calls it
        monkeypatch.setattr(module, "load_model_and_tokenizer", no_loading)
    cases = [(["chat", "--temperature", "-1"], "temperature"), (["chat", "--max-new-tokens", "0"], "max_new_tokens"),
             (["chat", "--top-p", "1.5"], "top_p"), (["chat", "--top-p", "-0.5"], "top_p"),
             (["chat", "--top-k", "-1"], "top_k"), (["chat", "--repetition-penalty", "0"], "repetition_penalty"),
             (["api", "--port", "99999"], "--port"), (["api", "--port", "-1"], "--port")]
    for argv, name in cases:
        assert main([*argv, "--model", "m"]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name} must be") and len(err.splitlines()) == 1, (argv, err)
    for command in ("chat", "api"):
        assert main([command, "--model", "m", "--template", "chatlm"]) == 1
        err = capsys.readouterr().err.strip()
        assert (err.startswith("error: Unknown --template 'chatlm'. Did you mean 'chatml'?")
                and len(err.splitlines()) == 1)


def random_lora_adapter(base_dir, adapter_dir, seed: int = 0) -> None:
    """A LoRA adapter with large random weights, so the merged model is far from the base."""
    torch.manual_seed(seed)
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.2)
    tuned.save(adapter_dir)


@pytest.fixture
def base_and_adapter(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    save_word_tokenizer(base_dir)
    random_lora_adapter(base_dir, adapter_dir)
    return base_dir, adapter_dir


def logits(folder, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=input_ids).logits


def test_export_legacy_format_also_writes_bin_weights(base_and_adapter, tmp_path, input_ids) -> None:
    """false: safetensors only; true: the same tensors also as pytorch_model.bin, which loads alone."""
    base_dir, adapter_dir = base_and_adapter
    common = [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}"]
    assert main(["export", *common, f"export_dir={tmp_path / 'plain'}", "export_legacy_format=false"]) == 0
    assert not list((tmp_path / "plain").glob("*.bin"))
    assert main(["export", *common, f"export_dir={tmp_path / 'legacy'}", "export_legacy_format=true"]) == 0
    legacy = tmp_path / "legacy"
    assert (legacy / "model.safetensors").is_file() and (legacy / "pytorch_model.bin").is_file()
    expected = logits(tmp_path / "plain", input_ids)
    (legacy / "model.safetensors").unlink()  # what a .bin-only reader sees
    assert torch.equal(logits(legacy, input_ids), expected)
    # the marker lists the .bin files too, so overwrite_output_dir may replace the folder
    assert main(["export", *common, f"export_dir={legacy}", "export_legacy_format=true",
                 "overwrite_output_dir=true"]) == 0


def test_bin_copies_of_sharded_weights_load_through_their_index(tmp_path, input_ids) -> None:
    from peftkit.export.merge import write_bin_copies

    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    written = write_bin_copies(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        [s.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin") for s in shards]
        + ["pytorch_model.bin.index.json"])
    for f in [*shards, tmp_path / "model.safetensors.index.json"]:
        f.unlink()
    with torch.no_grad():
        assert torch.equal(logits(tmp_path, input_ids), model(input_ids=input_ids).logits)


def test_export_device_auto_without_a_gpu_merges_on_the_cpu(base_and_adapter, tmp_path, capsys) -> None:
    base_dir, adapter_dir = base_and_adapter
    common = [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}"]
    assert main(["export", *common, f"export_dir={tmp_path / 'cpu'}", "export_device=cpu"]) == 0
    assert main(["export", *common, f"export_dir={tmp_path / 'auto'}", "export_device=auto"]) == 0
    out = capsys.readouterr().out
    assert ("export_device: auto found no GPU" in out) == (not torch.cuda.is_available())
    same = ((tmp_path / "cpu" / "model.safetensors").read_bytes()
            == (tmp_path / "auto" / "model.safetensors").read_bytes())
    assert same or torch.cuda.is_available()
    assert main(["export", *common, f"export_dir={tmp_path / 'x'}", "export_device=gpu"]) == 1
    err = capsys.readouterr().err
    assert "export_device 'gpu' is not one of: cpu, auto" in err and not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: export_device auto merges there")
def test_export_device_auto_merges_on_the_gpu_to_the_cpu_result(base_and_adapter) -> None:
    from peftkit.export.merge import load_merged

    base_dir, adapter_dir = base_and_adapter
    on_cpu, _ = load_merged(str(base_dir), str(adapter_dir), device="cpu")
    on_gpu, _ = load_merged(str(base_dir), str(adapter_dir), device="auto")
    gpu = on_gpu.state_dict()
    for name, tensor in on_cpu.state_dict().items():
        assert gpu[name].device.type == "cpu"  # handed back where the writers read it
        assert (gpu[name] - tensor).abs().max() <= 1e-6, name


def test_export_hub_model_id_is_refused_offline_before_loading(base_and_adapter, tmp_path, monkeypatch, capsys) -> None:
    import peftkit.export.merge
    import peftkit.models

    def no_loading(*_, **__):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in (peftkit.models, peftkit.export.merge):  # where it is defined, and where export calls it
        monkeypatch.setattr(module, "load_model_and_tokenizer", no_loading)
    base_dir, adapter_dir = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}",
                 f"export_dir={out}", "export_hub_model_id=me/merged"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export_hub_model_id: me/merged" in err and "offline" in err
    assert f"huggingface-cli upload me/merged {out}" in err and not out.exists()
    for setting, gguf_type in (("export_quantization_bit=8", "q8_0"), ("export_quantization_dataset=c4.json", "q4_0")):
        assert main(["export", f"model_name_or_path={base_dir}", f"export_dir={out}", setting]) == 1
        err = capsys.readouterr().err
        assert "not supported" in err and f"export_format: gguf with export_gguf_type: {gguf_type}" in err


class FakeEngine:
    """Stands in for the loaded model: records what `peftkit chat` asks of it."""

    default_adapter = None

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reply(self, messages, params=None, adapter=None) -> str:
        self.calls.append((messages, params))
        return "ok"


def test_chat_passes_every_sampling_option(monkeypatch, capsys) -> None:
    import peftkit.cli

    engine = FakeEngine()
    loaded = {}

    def fake_load(args, template=None, enable_thinking=True):
        loaded.update(template=template, enable_thinking=enable_thinking)
        return engine

    monkeypatch.setattr(peftkit.cli, "_load_chat_model", fake_load)
    assert main(["chat", "--model", "m", "--once", "Hi", "--system", "Be brief.", "--template", "chatml",
                 "--max-new-tokens", "7", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
                 "--repetition-penalty", "1.3"]) == 0
    (messages, params), = engine.calls
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        7, 0.7, 0.9, 5, 1.3) and params.sampling
    assert loaded == {"template": "chatml", "enable_thinking": True}
    assert capsys.readouterr().out.strip() == "ok"
    # top-k without a temperature: greedy, and said so
    assert main(["chat", "--model", "m", "--once", "Hi", "--top-k", "5"]) == 0
    assert "--top-k and --top-p shape sampling" in capsys.readouterr().err and not engine.calls[-1][1].sampling


@pytest.fixture
def prompts(monkeypatch) -> list[str]:
    """Every prompt the chat engine renders, as text."""
    from peftkit.serve import ChatEngine

    seen: list[str] = []
    render = ChatEngine.prompt_ids

    def spy(self, messages, tools=None):
        ids = render(self, messages, tools)
        seen.append(self.tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(ChatEngine, "prompt_ids", spy)
    return seen


def trained_adapter(model_dir, folder, **train_config) -> str:
    random_lora_adapter(model_dir, folder)
    (folder / "train_config.json").write_text(json.dumps(train_config))
    return str(folder)


def test_chat_follows_the_template_the_adapter_was_trained_with(small_model_dir, tmp_path, prompts,  # noqa: F811
                                                                capsys) -> None:
    adapter = trained_adapter(small_model_dir, tmp_path / "alpaca", template="alpaca")
    chat = ["chat", "--model", str(small_model_dir), "--adapter", adapter, "--once", "Hi", "--max-new-tokens", "2"]
    assert main(chat) == 0
    assert "### Instruction:\nHi\n\n### Response:\n" in prompts[-1]
    assert "Using template 'alpaca', as the adapter was trained" in capsys.readouterr().err
    assert main([*chat, "--template", "chatml"]) == 0  # overridden
    assert prompts[-1].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "### Instruction" not in prompts[-1]
    (tmp_path / "alpaca" / "train_config.json").unlink()  # no record (e.g. a PEFT adapter): the tokenizer's own
    assert main(chat) == 0
    assert prompts[-1].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # enable_thinking as trained (the qwen3 template is another engineer's addition): an empty think block prompted
    thinking = trained_adapter(small_model_dir, tmp_path / "qwen3", template="qwen3", enable_thinking=False)
    assert main(["chat", "--model", str(small_model_dir), "--adapter", thinking, "--once", "Hi",
                 "--max-new-tokens", "2"]) == 0
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_api_uses_the_adapters_training_template_and_refuses_a_mix(small_model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                   capsys) -> None:
    import peftkit.serve.api

    served = {}
    monkeypatch.setattr(peftkit.serve.api, "serve", lambda engine, *_, **__: served.update(engine=engine))
    a = trained_adapter(small_model_dir, tmp_path / "a", template="alpaca")
    b = trained_adapter(small_model_dir, tmp_path / "b", template="alpaca")
    api = ["api", "--model", str(small_model_dir), "--adapter", f"a={a}", "--adapter", f"b={b}"]
    assert main(api) == 0
    assert served["engine"].template.name == "alpaca" and served["engine"].adapters == ["a", "b"]
    assert main([*api, "--template", "chatml"]) == 0
    assert served["engine"].template.name == "chatml"
    c = trained_adapter(small_model_dir, tmp_path / "c", template="chatml")
    assert main([*api, "--adapter", f"c={c}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: The adapters were trained with different templates") and "--template" in err
    assert f"{a}: alpaca" in err and f"{c}: chatml" in err
