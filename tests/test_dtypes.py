"""Both base precisions on every machine (issue 15, item 13): every method trains, saves, reloads and merges on a
float32 and on a bfloat16 base (some on float16 too); QLoRA computes in either; `peftkit train` picks the forced dtype;
generation and export of an adapter trained on bf16. Where peftkit picks the dtype itself (load_model's "auto", the
trainer's `base_dtype`) it is forced through $PEFTKIT_DTYPE, so a CPU without native bf16 runs the bf16 path too
(slowly there: the models are tiny)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import VOCAB, save_chat_model, tiny_llama, train_losses
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peftkit.models
import peftkit.train.run
from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    FreezeConfig,
    FullConfig,
    Ia3Config,
    LoraConfig,
    LoraDropConfig,
    MethodConfig,
    PeftkitError,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    SsfConfig,
    TunedModel,
    available_methods,
    get_method,
)
from peftkit.cli import main
from peftkit.models import load_model
from peftkit.quantization import QuantizationConfig, is_quantized_param
from peftkit.serve import ChatEngine, GenerationParams
from peftkit.tuned import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS = 10


@pytest.fixture(params=list(DTYPES))
def dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.dtype:
    """The base dtype, forced for everything that picks its own: load_model's "auto" and the trainer's choice."""
    monkeypatch.setenv("PEFTKIT_DTYPE", request.param)
    return DTYPES[request.param]


def rounding(reference: torch.Tensor, dtype: torch.dtype, stages: int = 5) -> float:
    """How far two computations of `reference` that round to `dtype` at different places may differ (a merged weight
    is rounded once; unmerged, the base output and the adapter's are rounded apart). Each of the `stages` matmuls on
    the way to the logits (attention and MLP of 2 layers, the head) rounds its output and the residual sum it enters,
    u = eps/2 each, on either side; plus float32 accumulation over 64 terms (CPU and GPU matmuls accumulate in float32
    whatever the dtype). For bf16 (u = 2**-8) that is 8% of the largest logit; a merge that drops or doubles the
    adapter moves the logits by its whole effect, which the tests require to be far larger."""
    u, acc = torch.finfo(dtype).eps / 2, 8 * torch.finfo(torch.float32).eps / 2
    return stages * (4 * u + 2 * acc) * reference.abs().max().item()


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of the input tokens only (prompt methods' virtual tokens left out), in float32."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits[:, -input_ids.shape[1]:].float()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# --- every method: train, save, reload, merge ---
@dataclasses.dataclass(frozen=True)
class Spec:
    config: Callable[[], MethodConfig]
    lr: float
    drop: float  # the last 3 losses' mean must fall below this share of the first 3's (measured + ~0.1)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)


P = 4  # virtual tokens
METHODS: dict[str, Spec] = {
    "lora": Spec(lambda: LoraConfig(r=4, target_modules="all-linear"), 1e-2, 0.7),
    "dora": Spec(lambda: LoraConfig(r=4, use_dora=True, target_modules="all-linear"), 1e-2, 0.7),
    "rslora": Spec(lambda: LoraConfig(r=4, use_rslora=True, target_modules="all-linear"), 1e-2, 0.6),
    "loraplus": Spec(lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", loraplus_lr_ratio=16), 2e-3,
                     0.7),
    "lora_modules_to_save": Spec(lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]), 1e-2, 0.8),
    "lora_drop": Spec(lambda: LoraDropConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             lora_drop_sample_ratio=0.25, lora_drop_threshold=0.5), 3e-2, 0.55),
    "adalora": Spec(lambda: AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear", lora_alpha=32, tinit=2,
                                          tfinal=3), 5e-2, 0.6),
    "ia3": Spec(lambda: Ia3Config(), 2e-1, 0.88),
    "ssf": Spec(lambda: SsfConfig(target_modules="all-linear"), 5e-2, 0.8),
    "bitfit": Spec(lambda: BitFitConfig(), 1e-1, 0.78, {"lr_scheduler_type": "constant"}),
    "adapter": Spec(lambda: AdapterConfig(), 5e-2, 0.75),
    "freeze": Spec(lambda: FreezeConfig(freeze_trainable_layers=1), 3e-2, 0.45),
    "full": Spec(lambda: FullConfig(), 1e-2, 0.35),
    "prompt_tuning": Spec(lambda: PromptTuningConfig(num_virtual_tokens=P), 1e-1, 0.85),
    "p_tuning": Spec(lambda: PTuningConfig(num_virtual_tokens=P), 1e-1, 0.9),
    "prefix_tuning": Spec(lambda: PrefixTuningConfig(num_virtual_tokens=P), 1e-1, 0.83),
    "p_tuning_v2": Spec(lambda: PTuningV2Config(num_virtual_tokens=P), 1e-1, 0.95),
}


def test_every_method_is_covered() -> None:
    covered = {type(spec.config()).method for spec in METHODS.values()}
    assert covered == set(available_methods())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (untied head) as a model folder: load_model then builds it in the forced dtype, rotary
    frequencies in float32 as transformers keeps them (a `.to(bf16)` model would round those too)."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(initializer_range=0.2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_reloads_and_merges(name: str, dtype: torch.dtype, llama_dir: Path, tmp_path: Path,
                                                input_ids: torch.Tensor) -> None:
    check_method(name, dtype, llama_dir, tmp_path, input_ids)


# fp16: torch 2.13 multiplies it on CPUs too (converting where they have no native fp16, as this one). A subset, one
# of each kind of method: weight deltas, DoRA's norms, scaling vectors, in-place training, added layers, prefixes.
@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "ssf", "freeze", "adapter", "p_tuning_v2"])
def test_fp16_base(name: str, monkeypatch: pytest.MonkeyPatch, llama_dir: Path, tmp_path: Path,
                   input_ids: torch.Tensor) -> None:
    monkeypatch.setenv("PEFTKIT_DTYPE", "fp16")
    check_method(name, torch.float16, llama_dir, tmp_path, input_ids)


def check_method(name: str, dtype: torch.dtype, llama_dir: Path, tmp_path: Path, input_ids: torch.Tensor) -> None:
    """Train a few steps on a base in `dtype`, save, reload onto a fresh base, merge."""
    spec = METHODS[name]
    model = load_model(str(llama_dir)).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}  # $PEFTKIT_DTYPE decided
    base_logits = logits(model, input_ids)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    torch.manual_seed(0)
    tuned = TunedModel(model, spec.config())
    in_place = tuned.method.in_place

    losses = train_losses(tuned, tmp_path, steps=STEPS, lr=spec.lr, per_device_train_batch_size=8, **spec.train)
    assert all(math.isfinite(x) for x in losses) and len(losses) == STEPS
    assert mean(losses[-3:]) < spec.drop * mean(losses[:3]), losses
    trainable = tuned.trainable_parameters()
    assert trainable and {p.dtype for _, p in trainable} == {torch.float32}  # AdamW steps need fp32's resolution
    frozen = [p for p in tuned.model.parameters() if not p.requires_grad]
    if name == "full":  # trains every tensor, upcast to float32 (documented); nothing stays frozen
        assert frozen == []
    else:
        assert frozen and all(id(p) in before for p in frozen)  # only base tensors are frozen
        assert {p.dtype for p in frozen} == {dtype}  # kept their dtype: no silent up- or downcast
        assert all(torch.equal(p, before[id(p)]) for p in frozen)  # and their values

    tuned.eval()
    trained = logits(tuned, input_ids)
    effect = (trained - base_logits).abs().max().item()
    out = tmp_path / "saved"
    tuned.save(out)
    if name == "full":  # a complete model folder, in float32
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
        again = load_model(str(out), dtype=torch.float32)
    else:
        assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
        again = TunedModel.load(load_model(str(llama_dir)), out)
    if name == "adalora":  # pruned triplets are left out of the reloaded sums: equal up to rounding
        assert (logits(again, input_ids) - trained).abs().max() <= rounding(trained, dtype)
    else:
        assert torch.equal(logits(again, input_ids), trained)

    if not tuned.method.mergeable:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            tuned.merge_adapter()
        return
    merged_model = tuned.merge_and_unload()
    merged = logits(merged_model, input_ids)
    if in_place:  # its training already changed the base weights: merging is a no-op
        assert torch.equal(merged, trained)
        return
    assert {p.dtype for p in merged_model.parameters()} == {dtype}  # merged into the base weights in their dtype
    tol = rounding(trained, dtype)
    assert (merged - trained).abs().max() <= tol
    assert effect > 4 * tol  # the adapter matters far more than rounding: a lost or doubled update would show


# --- QLoRA: 4- and 8-bit bases computing in float32 or bfloat16 ---
@pytest.fixture(scope="module")
def quantizable_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama with its own output head (the bf16 lm_head that crashed, item 11) and a Qwen2 (q/k/v biases) whose head
    is its embedding table."""
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         initializer_range=0.3))
    dirs = {}
    for arch, model in (("llama", tiny_llama(initializer_range=0.3)), ("qwen2", qwen2)):
        dirs[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(dirs[arch])
    return dirs


@pytest.mark.parametrize("arch, bits", [("llama", 4), ("llama", 8), ("qwen2", 4)])
def test_qlora_in_the_forced_compute_dtype_trains_and_reloads(arch: str, bits: int, dtype: torch.dtype,
                                                              quantizable_dirs: dict[str, Path], tmp_path: Path,
                                                              input_ids: torch.Tensor) -> None:
    folder, quantization = str(quantizable_dirs[arch]), QuantizationConfig(bits)
    model = load_model(folder, quantization=quantization).eval()  # dtype "auto": the trainer's choice, forced here
    assert model.config.tie_word_embeddings == (arch == "qwen2")
    packed = {m: m.weight.data.clone() for m in model.modules() if is_quantized_param(getattr(m, "weight", None))}
    assert len(packed) == 2 * 7  # every linear of the 2 layers; the head stays unquantized, as in QLoRA
    if bits == 4:
        assert {m.compute_dtype for m in packed} == {dtype}
    rest = {n: p for n, p in model.named_parameters() if not is_quantized_param(p)}
    for n, p in rest.items():  # norms in float32 as QLoRA trains them; embeddings, head and biases in the compute dtype
        assert p.dtype == (torch.float32 if "norm" in n else dtype), n
    frozen = {n: p.detach().clone() for n, p in rest.items()}

    torch.manual_seed(0)
    tuned = TunedModel(model, LoraConfig(r=8, target_modules="all-linear"))
    losses = train_losses(tuned, tmp_path, steps=STEPS, lr=1e-2, per_device_train_batch_size=8)
    assert all(math.isfinite(x) for x in losses) and mean(losses[-3:]) < 0.8 * mean(losses[:3]), losses
    assert {p.dtype for _, p in tuned.trainable_parameters()} == {torch.float32}
    assert all(torch.equal(m.weight.data, w) for m, w in packed.items())
    now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not is_quantized_param(p)}
    assert all(now[n].dtype == p.dtype and torch.equal(now[n], p) for n, p in frozen.items())

    expected = logits(tuned.eval(), input_ids)
    again = TunedModel.load(load_model(folder, quantization=quantization), tmp_path / "out")
    assert torch.equal(logits(again, input_ids), expected)


@pytest.mark.parametrize("name", [n for n, spec in METHODS.items() if not get_method(spec.config().method).in_place])
def test_every_adapter_method_on_a_4bit_base(name: str, dtype: torch.dtype, llama_dir: Path, tmp_path: Path,
                                            input_ids: torch.Tensor) -> None:
    """The adapter methods on QLoRA's base in either compute dtype: DoRA's norms of dequantized weights, IA3's and
    SSF's scales, bottleneck adapters and virtual tokens meet 4-bit linears and their bf16 or float32 outputs."""
    spec, nf4 = METHODS[name], QuantizationConfig(4)
    model = load_model(str(llama_dir), quantization=nf4).eval()
    packed = {m: m.weight.data.clone() for m in model.modules() if is_quantized_param(getattr(m, "weight", None))}
    torch.manual_seed(0)
    tuned = TunedModel(model, spec.config())
    losses = train_losses(tuned, tmp_path, steps=STEPS, lr=spec.lr, per_device_train_batch_size=8, **spec.train)
    assert all(math.isfinite(x) for x in losses) and mean(losses[-3:]) < spec.drop * mean(losses[:3]), losses
    assert {p.dtype for _, p in tuned.trainable_parameters()} == {torch.float32}
    assert all(torch.equal(m.weight.data, w) for m, w in packed.items())
    trained = logits(tuned.eval(), input_ids)
    again = logits(TunedModel.load(load_model(str(llama_dir), quantization=nf4), tmp_path / "out"), input_ids)
    if name == "adalora":  # pruned triplets are left out of the reloaded sums: equal up to rounding
        assert (again - trained).abs().max() <= rounding(trained, dtype)
    else:
        assert torch.equal(again, trained)
    with pytest.raises(PeftkitError):  # never into 4-bit weights (mergeable methods) or not at all (the others)
        tuned.merge_adapter()


# --- a chat model: byte-level tokenizer with a ChatML template, for training from the CLI, generation and export ---
@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def bf16_adapter(chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained (10 steps) on the chat model loaded in bf16."""
    tmp = tmp_path_factory.mktemp("bf16_adapter")
    torch.manual_seed(0)
    tuned = TunedModel(load_model(str(chat_dir), dtype=torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    train_losses(tuned, tmp, steps=STEPS, per_device_train_batch_size=8)
    return tmp / "out"


def test_cli_train_picks_the_forced_dtype_for_qlora(dtype: torch.dtype, chat_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, input_ids: torch.Tensor) -> None:
    """`peftkit train` with no bf16 / fp16 key: the automatic choice, here forced, decides QLoRA's compute dtype."""
    loaded = []
    real = peftkit.models.load_model_and_tokenizer

    def spy(*args: Any, **kwargs: Any) -> Any:
        model, tokenizer = real(*args, **kwargs)
        loaded.append(model.get_input_embeddings().weight.dtype)
        return model, tokenizer

    monkeypatch.setattr(peftkit.train.run, "load_model_and_tokenizer", spy)  # where `peftkit train` calls it
    out = tmp_path / "run"
    assert main(["train", "/dev/null", f"model_name_or_path={chat_dir}", "dataset=identity",
                 f"dataset_dir={ROOT / 'examples' / 'data'}", "max_samples=8", "cutoff_len=96", "max_steps=4",
                 "per_device_train_batch_size=4", "learning_rate=1e-2", "logging_steps=1", "quantization_bit=4",
                 "lora_target=all", f"output_dir={out}"]) == 0
    assert loaded == [dtype]
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0]

    def quantized() -> torch.nn.Module:
        return load_model(str(chat_dir), quantization=QuantizationConfig(4)).eval()

    base = logits(quantized(), input_ids)
    adapted = logits(TunedModel.load(quantized(), out), input_ids)
    assert torch.isfinite(adapted).all() and (adapted - base).abs().max() > 0.1  # the trained adapter loads and acts


# --- generation: batched == one at a time, on either base, with an adapter trained on bf16 ---
class Recorder:
    """Stands in for a model's `generate`, keeping each call's new tokens and the logits greedy decoding chose from."""

    def __init__(self, generate: Callable[..., Any]) -> None:
        self.generate, self.calls = generate, []

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        out = self.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        self.calls.append((out.sequences[:, kwargs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()))
        return out.sequences


def test_generation_batched_equals_one_at_a_time(dtype: torch.dtype, chat_dir: Path, bf16_adapter: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In float32 the left-padded batch generates exactly what each prompt does alone. In bf16 padding changes the
    lengths of the sums, so logits move by a few bf16 steps and greedy decoding may take the other of two tokens
    whose logits were that close (this random model has near ties): there the tokens may part, and only there."""
    model, tokenizer = load_for_inference(str(chat_dir), bf16_adapter)  # as `peftkit chat` loads: dtype "auto"
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}
    engine = ChatEngine(model, tokenizer)
    recorder = Recorder(model.generate)
    monkeypatch.setattr(model, "generate", recorder)
    prompts = [engine.prompt_ids([{"role": "user", "content": text}])
               for text in ("Hi", "Who are you? Tell me about yourself.", "What is one plus one?")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is left-padded
    params = GenerationParams(max_new_tokens=10)
    batched = engine.generate(prompts, params, adapter="default")
    single = [engine.generate([p], params, adapter="default")[0] for p in prompts]
    assert all(c.completion_tokens > 0 for c in batched)
    if dtype == torch.float32:
        assert [(c.text, c.completion_tokens) for c in batched] == [(c.text, c.completion_tokens) for c in single]
    (batch_tokens, batch_logits), *alone = recorder.calls
    for row, (tokens, step_logits) in enumerate(alone):
        tokens, step_logits = tokens[0], step_logits[0]
        parted = next((i for i, (a, b) in enumerate(zip(batch_tokens[row], tokens)) if a != b), len(tokens))
        same_context = min(parted + 1, len(tokens))  # the step where the tokens part still saw the same ones
        tol = rounding(step_logits, dtype)
        assert (batch_logits[row, :same_context] - step_logits[:same_context]).abs().max() <= tol
        if parted < len(tokens):
            top2 = step_logits[parted].topk(2).values
            assert top2[0] - top2[1] <= 2 * tol, (row, parted)  # a near tie, decided by rounding
    base = engine.generate(prompts, params, adapter=None)
    assert [c.text for c in base] != [c.text for c in batched]  # the adapter was used


# --- export of the adapter trained on bf16 ---
@pytest.mark.parametrize("infer_dtype", ["bfloat16", "float32"])
def test_export_merges_in_float32_and_writes_infer_dtype(infer_dtype: str, chat_dir: Path, bf16_adapter: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         input_ids: torch.Tensor) -> None:
    """Export merges on a float32 load of the base whatever $PEFTKIT_DTYPE says (one rounding, at the end), so the
    float32 export is base + adapter exactly and the bf16 one is that rounded once."""
    monkeypatch.setenv("PEFTKIT_DTYPE", "bf16")
    out = tmp_path / "merged"
    assert main(["export", f"model_name_or_path={chat_dir}", f"adapter_name_or_path={bf16_adapter}",
                 f"export_dir={out}", f"infer_dtype={infer_dtype}"]) == 0
    expected = {"bfloat16": torch.bfloat16, "float32": torch.float32}[infer_dtype]
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {expected}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert merged.dtype == expected and {p.dtype for p in merged.parameters()} == {expected}
    exact = logits(TunedModel.load(load_model(str(chat_dir), dtype=torch.float32), bf16_adapter), input_ids)
    trained = logits(TunedModel.load(load_model(str(chat_dir), dtype=torch.bfloat16), bf16_adapter), input_ids)
    base = logits(load_model(str(chat_dir), dtype=torch.float32), input_ids)
    exported = logits(merged, input_ids)
    assert (exported - exact).abs().max() <= rounding(exact, expected)
    assert (exported - trained).abs().max() <= rounding(exact, torch.bfloat16)  # what training saw, up to bf16
    assert (exact - base).abs().max() > 4 * rounding(exact, torch.bfloat16)  # the adapter matters


def test_gguf_export_of_a_bf16_trained_adapter(chat_dir: Path, bf16_adapter: Path, tmp_path: Path) -> None:
    """A bf16 GGUF holds the float32 merge rounded once to bf16."""
    import gguf

    from peftkit.export.merge import load_merged

    out = tmp_path / "gguf"
    assert main(["export", f"model_name_or_path={chat_dir}", f"adapter_name_or_path={bf16_adapter}",
                 f"export_dir={out}", "export_format=gguf", "export_gguf_type=bf16"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model-bf16.gguf").tensors}
    merged, _ = load_merged(str(chat_dir), str(bf16_adapter), progress=False)
    for name, hf in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                     ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                     ("output.weight", "lm_head.weight")):
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16, name
        weight = merged.get_parameter(hf).detach()
        stored = torch.from_numpy(tensor.data.copy().view("int16")).view(torch.bfloat16).reshape(weight.shape)
        assert torch.equal(stored, weight.to(torch.bfloat16)), name
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
