"""Shared fixtures: tiny random models built from configs (no downloads), seeded for repeatability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128

# LLaMA-Factory's demo data sets: ../shared/data beside the checkout (as on CI), or where PEFTKIT_TEST_DATA says.
SHARED_DATA = os.environ.get("PEFTKIT_TEST_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, verbatim: it must run once the model and data are local.
LLAMA_FACTORY_EXAMPLE = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
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
"""


def tiny_llama(seed: int = 0, initializer_range: float = 0.02) -> LlamaForCausalLM:
    """A larger `initializer_range` lets the logits move far enough for training tests (RMSNorm bounds them)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=initializer_range)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory):
    """A PEFTKIT_HOME shared by every slow test, so smollm2-135m is converted once (~20 s) and the user's cache is
    untouched."""
    from peftkit.models import resolve_model_path

    home = tmp_path_factory.mktemp("peftkit_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKIT_HOME", str(home))
        resolve_model_path("smollm2-135m")
    return home


@pytest.fixture
def smollm2(smollm2_home, monkeypatch: pytest.MonkeyPatch) -> str:
    """The alias `smollm2-135m`, resolving to the shared converted copy while the test runs."""
    monkeypatch.setenv("PEFTKIT_HOME", str(smollm2_home))
    return "smollm2-135m"
