"""LLaMA-Factory's own example files, verbatim, run in a scratch folder: its relative `saves/...` paths and `data`
folder stay as written; only the hub model id becomes a local model (and training is cut to a few steps)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import LLAMA_FACTORY_EXAMPLE, SHARED_DATA
from safetensors.torch import load_file
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)
from transformers import AutoModelForCausalLM

from peftkit import TunedModel
from peftkit.cli import main
from peftkit.models import load_model

# examples/train_lora/qwen3_lora_sft.yaml (hiyouga/LLaMA-Factory@77e7f47), verbatim
QWEN3_LORA_SFT = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/merge_lora/qwen3_lora_sft.yaml (hiyouga/LLaMA-Factory@dc85995), verbatim
QWEN3_MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
trust_remote_code: true

### export
export_dir: saves/qwen3_sft_merged
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""

# examples/train_lora/llama3_lora_predict.yaml (hiyouga/LLaMA-Factory@24073f5), verbatim
LLAMA3_PREDICT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
adapter_name_or_path: saves/llama3-8b/lora/sft

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 50
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/predict
overwrite_output_dir: true

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
ddp_timeout: 180000000
"""

# examples/merge_lora/llama3_gptq.yaml (hiyouga/LLaMA-Factory@083dbee), verbatim
LLAMA3_GPTQ = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
template: llama3
trust_remote_code: true

### export
export_dir: output/llama3_gptq
export_quantization_bit: 4
export_quantization_dataset: data/c4_demo.json
export_size: 2
export_device: cpu
export_legacy_format: false
"""

# what LLaMA-Factory's predict_results.json holds (transformers' Trainer.save_metrics, sorted keys)
LLAMA_FACTORY_PREDICT_KEYS = {"predict_bleu-4", "predict_model_preparation_time", "predict_rouge-1", "predict_rouge-2",
                              "predict_rouge-l", "predict_runtime", "predict_samples_per_second",
                              "predict_steps_per_second"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch folder laid out as LLaMA-Factory's checkout is: `data/` with its demo sets, `saves/` written there."""
    os.symlink(SHARED_DATA, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))  # the tokenized-data cache
    return tmp_path


def run(yaml_text: str, name: str, *argv: str) -> int:
    with open(name, "w") as f:
        f.write(yaml_text)
    return main([argv[0], name, *argv[1:]])


def test_qwen3_lora_sft_then_merge_lora_yaml(workdir, small_model_dir, capsys) -> None:  # noqa: F811
    model = f"model_name_or_path={small_model_dir}"
    assert run(QWEN3_LORA_SFT, "qwen3_lora_sft.yaml", "train", model, "max_steps=2") == 0
    adapter = workdir / "saves/qwen3-4b/lora/sft"
    assert json.loads((adapter / "train_config.json").read_text())["template"] == "qwen3_nothink"
    capsys.readouterr()

    assert run(QWEN3_MERGE, "merge_qwen3_lora_sft.yaml", "export", model) == 0
    out = capsys.readouterr().out
    merged_dir = workdir / "saves/qwen3_sft_merged"
    assert "Wrote the merged model (hf) to saves/qwen3_sft_merged" in out
    # the YAML names the template (qwen3_nothink, another engineer's addition), the tokenizer carries SmolLM2's own
    assert "trained with template 'qwen3_nothink'" in out
    files = set(os.listdir(merged_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(f.endswith(".bin") for f in files)  # export_legacy_format: false

    # the merge is W + (alpha / r) B A of the trained adapter, to float32 rounding, and B has moved off zero
    lora = {k: v.float() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    delta = (16 / 8) * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    base, merged = load_model(str(small_model_dir)), AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    change = merged.model.layers[1].self_attn.q_proj.weight - base.model.layers[1].self_attn.q_proj.weight
    assert delta.abs().max() > 1e-6
    assert (change - delta).abs().max() <= 1e-6 * delta.abs().max() + 1e-8
    tuned = TunedModel.load(base, adapter).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max() <= 1e-4


def test_llama3_lora_sft_then_predict_yaml(workdir, small_model_dir) -> None:  # noqa: F811
    """llama3_lora_sft.yaml trains the adapter that llama3_lora_predict.yaml reads; predict generates 8 tokens a row
    (LLaMA-Factory's generation default is 1024; a random model never stops on its own). 1091 rows tokenized, 100
    predicted one at a time, as the YAMLs say: ~10 s on 2 idle cores."""
    model = f"model_name_or_path={small_model_dir}"
    assert run(LLAMA_FACTORY_EXAMPLE, "llama3_lora_sft.yaml", "train", model, "max_steps=2") == 0
    with pytest.warns(UserWarning, match="Ignoring predict_with_generate=True: predict always generates"):
        assert run(LLAMA3_PREDICT, "llama3_lora_predict.yaml", "train", model, "max_new_tokens=8") == 0

    out = workdir / "saves/llama3-8b/lora/predict"
    text = (out / "predict_results.json").read_text()
    results = json.loads(text)
    assert LLAMA_FACTORY_PREDICT_KEYS <= set(results) and list(results) == sorted(results)
    assert text == json.dumps(results, indent=4, sort_keys=True) + "\n"  # as transformers' save_metrics writes it
    assert 0 <= results["predict_model_preparation_time"] < results["predict_runtime"]
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 100  # max_samples: 50 of each of the two eval datasets, as LLaMA-Factory counts
    assert results["predict_samples_per_second"] == pytest.approx(100 / results["predict_runtime"], rel=0.01)
    assert results["predict_steps_per_second"] == pytest.approx(100 / results["predict_runtime"], rel=0.01)  # bs 1
    # prompts in the llama3 template (another engineer's addition)
    assert all("<|start_header_id|>user<|end_header_id|>\n\n" in r["prompt"] for r in rows)
    assert all(r["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") for r in rows)


def test_llama3_gptq_yaml_is_refused_naming_gguf(workdir, small_model_dir, monkeypatch, capsys) -> None:  # noqa: F811
    import peftkit.export.merge
    import peftkit.models

    def no_loading(*_, **__):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in (peftkit.models, peftkit.export.merge):  # where it is defined, and where export calls it
        monkeypatch.setattr(module, "load_model_and_tokenizer", no_loading)
    assert run(LLAMA3_GPTQ, "llama3_gptq.yaml", "export", f"model_name_or_path={small_model_dir}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export_quantization_bit: 4") and len(err.splitlines()) == 1
    assert "not supported" in err and "export_format: gguf with export_gguf_type: q4_0" in err
    assert not (workdir / "output").exists()


# examples/train_lora/llama3_lora_{dpo,pretrain,reward,kto}.yaml (hiyouga/LLaMA-Factory@e6aa967, 8234462, 512ac7f,
# 5817cda), verbatim
LLAMA3_DPO = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

### method
stage: dpo
do_train: true
finetuning_type: lora
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]

### dataset
dataset: dpo_en_demo
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

LLAMA3_PRETRAIN = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

### method
stage: pt
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: c4_demo
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/pretrain
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

LLAMA3_REWARD = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: rm
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: dpo_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/reward
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: dpo_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

LLAMA3_KTO = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: kto
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1

### dataset
dataset: kto_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/kto
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""


@pytest.fixture
def workdir_with_kto(tmp_path, monkeypatch):
    """As `workdir`, with LLaMA-Factory's kto_en_demo entry backed by a file of that shape (the repo's identity_kto
    set: OpenAI-style messages with a `label` true/false), since ../shared/data lacks the file."""
    data = tmp_path / "data"
    data.mkdir()
    for f in os.listdir(SHARED_DATA):
        os.symlink(os.path.join(SHARED_DATA, f), data / f)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.symlink(os.path.join(repo, "examples", "data", "identity_kto.json"), data / "kto_en_demo.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("name,yaml_text,out,logged", [
    ("llama3_lora_dpo.yaml", LLAMA3_DPO, "saves/llama3-8b/lora/dpo", "eval_rewards/accuracies"),
    ("llama3_lora_pretrain.yaml", LLAMA3_PRETRAIN, "saves/llama3-8b/lora/pretrain", "eval_perplexity"),
    ("llama3_lora_reward.yaml", LLAMA3_REWARD, "saves/llama3-8b/lora/reward", "rewards/accuracies"),
    ("llama3_lora_kto.yaml", LLAMA3_KTO, "saves/llama3-8b/lora/kto", "kl"),
])
def test_llama_factory_stage_yamls_run_unchanged(workdir_with_kto, small_model_dir, name, yaml_text, out,  # noqa: F811
                                                 logged) -> None:
    model = f"model_name_or_path={small_model_dir}"
    assert run(yaml_text, name, "train", model, "max_steps=2", "logging_steps=1") == 0
    folder = workdir_with_kto / out
    log = [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines()]
    assert any(logged in e for e in log)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (folder / "training_loss.png").is_file()
    if "reward" in name:
        assert (folder / "value_head.safetensors").is_file()
