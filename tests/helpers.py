"""Plain helpers shared by the tests (fixtures live in conftest): tiny random models built from configs (no
downloads), seeded for repeatability; the shared data paths; a trainer config namespace, learnable data, a short run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftkit.config import TrainConfig
from peftkit.data import SFTCollator
from peftkit.train import Trainer

VOCAB = 128
ATOL = 1e-5  # float32 logits of two computations that differ only in summation order (merge, PEFT's layers)

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


def tiny_llama(seed: int = 0, initializer_range: float = 0.02, num_hidden_layers: int = 2) -> LlamaForCausalLM:
    """A larger `initializer_range` lets the logits move far enough for training tests (RMSNorm bounds them)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers,
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


def make_cfg(tmp_path, **overrides) -> TrainConfig:
    """A TrainConfig for driving the Trainer directly on in-memory data (no model path or dataset is read).

    The data comes from the test, so an evaluation set is named only to satisfy load_best_model_at_end's check."""
    cfg = dict(
        model_name_or_path="tiny-test-model", output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
        per_device_eval_batch_size=4, learning_rate=1e-2, num_train_epochs=2.0, logging_steps=1, seed=7,
    )
    cfg.update(overrides)
    if cfg.get("load_best_model_at_end"):
        cfg.setdefault("eval_dataset", ["given-by-the-test"])
    return TrainConfig(**cfg)


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """Variable-length random prompts with an easily learnt answer (fixed tokens), loss on the answer only."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        answer = [5, 6, 7, 8, prompt[0]]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def run(cfg, data, tuned, eval_data=None, padding_free: bool = False) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, tuned, data, SFTCollator(pad_token_id=0, padding_free=padding_free), eval_data)
    return trainer, trainer.train()


def read_log(cfg) -> list[dict]:
    path = f"{cfg.output_dir}/trainer_log.jsonl"
    return [json.loads(line) for line in open(path) if line.strip()]


def train_losses(tuned, tmp_path, steps: int = 30, lr: float = 1e-2, **overrides) -> list[float]:
    """Train `tuned`'s active adapter for `steps` steps on `synthetic_examples`; the logged loss of every step."""
    cfg = make_cfg(tmp_path, max_steps=steps, learning_rate=lr, **overrides)
    run(cfg, synthetic_examples(16), tuned)
    return [e["loss"] for e in read_log(cfg) if "loss" in e]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters that differ from `before` (parameters new since then count as changed)."""
    return {n for n, p in model.named_parameters() if n not in before or not torch.equal(p, before[n])}


def rounding_tolerance(reference: torch.Tensor, dtype: torch.dtype = torch.float32, terms: int = 64,
                       depth: int = 6) -> float:
    """How far two mathematically equal computations of `reference` may differ by rounding alone: `dtype`'s epsilon,
    growing with the square root of the longest sum (`terms`) and with the chained matmuls (`depth`), relative to the
    values' size. A bound from the arithmetic, not from one CPU's summation order; a real bug is orders larger."""
    eps = torch.finfo(dtype).eps
    return 8 * eps * math.sqrt(terms) * depth * max(1.0, reference.abs().max().item())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(method, scale: float, seed: int = 0, keys: Callable[[str], bool] | None = None) -> None:
    """Perturb every tensor of `method.state_dict()` (those whose key passes `keys`) by N(0, scale²), seeded, so that
    the adapter is not at its identity start (B = 0, scales of one) and comparisons test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in method.state_dict().items():
            if keys is None or keys(key):
                t.add_(torch.randn(t.shape, generator=g) * scale)


def save_random_lora(model_dir: Path, folder: Path, scale: float) -> Path:
    """A LoRA adapter (r 4, every linear layer) on the saved model `model_dir`, each tensor plus N(0, scale²) from
    the global generator seeded 0 (B != 0: it changes the logits), saved to `folder`."""
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, TunedModel

    torch.manual_seed(0)
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * scale)
    tuned.save(folder)
    return folder


# --- a chat model: byte-level tokenizer with a ChatML template, for training from the CLI, generation and export ---
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges (one token per byte): built in milliseconds, and GGUF export knows it (gpt-2)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(SPECIAL + alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def save_chat_model(folder: Path, tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
                    **config: Any) -> Path:
    """A random Llama (by default 2 layers, width 32) with the byte-level ChatML tokenizer (or `tokenizer`), saved as
    a model folder; `config` overrides LlamaConfig's fields."""
    tokenizer = tokenizer or byte_tokenizer()
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
