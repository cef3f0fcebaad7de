"""GGUF export, checked by llama.cpp itself (llama-cpp-python): logits, greedy tokens, tokenizer ids, LoRA GGUF."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import SHARED_DATA
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from peftkit import LoraConfig, TunedModel
from peftkit.cli import main
from peftkit.config import GGUF_TYPES
from peftkit.errors import ExportError
from peftkit.export import write_gguf, write_gguf_lora
from peftkit.export.gguf import GGUF_TYPES as WRITER_TYPES
from peftkit.export.gguf import permute_rows
from peftkit.export.gguf_vocab import _LLAMA3, _QWEN2

MIXED = "Hello world! It's 12345 apples, 你好，世界。龘😀🎉 naïve café\n\n  indented\ttab <|im_end|> done"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 1024


# --- fixtures: byte-level BPE tokenizers trained here, tiny models built from configs ---------------------------------

def _corpus():
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        for row in json.loads((Path(SHARED_DATA) / name).read_text())[:300]:
            yield f"{row['instruction']}\n{row['input']}\n{row['output']}"
    yield "😀🎉👍 emoji 12345 6789 naïve café\n\n  spaces\ttabs"


def make_tokenizer(pre: str = "gpt-2", vocab: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer in one of the pre-tokenizer styles llama.cpp knows (GPT-2, SmolLM, Llama 3, Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "starcoder"))
    steps = {
        "gpt-2": [byte_level],
        "starcoder": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "llama-bpe": [pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"), byte_level],
        "qwen2": [pre_tokenizers.Split(Regex(_QWEN2), behavior="isolated"), byte_level],
    }[pre]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def make_sentencepiece_tokenizer(style: str = "normalizer", vocab: int = 700) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer with byte fallback, laid out like Llama 2's (<unk> <s> </s>, 256 byte
    tokens, then the pieces). `style`: "normalizer" puts the leading "▁" as Llama 2's tokenizer.json does,
    "metaspace" as Mistral 7B v0.3's does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab, limit_alphabet=200,
                                                                   show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    order = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    order += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in order]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(order)}, merges, byte_fallback=True, unk_token="<unk>",
                               fuse_unk=True))
    if style == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer("gpt-2")


def tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """initializer_range 0.1 spreads the logits (std ~1), so a layout error shows far above the 1e-2 tolerance."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1,
                         **overrides)
        return GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**{**common, **overrides})).eval()
    if arch == "qwen3":  # head_dim is not hidden / heads, as in Qwen3-0.6B
        return Qwen3ForCausalLM(Qwen3Config(**{**common, "head_dim": 32, **overrides})).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**{**common, "sliding_window": None, **overrides})).eval()
    if arch == "phi3":  # rotating half of each head, as Phi-4-mini rotates three quarters
        return Phi3ForCausalLM(Phi3Config(**{**common, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5}, **overrides})).eval()
    if arch.startswith("gemma"):
        return _tiny_gemma(arch, common, overrides)
    return LlamaForCausalLM(LlamaConfig(**{**common, "rope_theta": 10000.0, **overrides})).eval()


def _tiny_gemma(arch: str, common: dict, overrides: dict) -> torch.nn.Module:
    """Gemma's features at sizes that make each one move the logits: a sliding window (8) shorter than the prompt,
    soft-caps (2 and 5) near the logits' own size, Gemma 3's one global layer in six with linearly scaled rope."""
    gemma = {**common, "head_dim": 32}
    if arch == "gemma":
        return GemmaForCausalLM(GemmaConfig(**{**gemma, **overrides})).eval()
    gemma |= {"query_pre_attn_scalar": 32, "sliding_window": 8}
    if arch == "gemma2":
        cfg = Gemma2Config(**{**gemma, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0, **overrides})
        return Gemma2ForCausalLM(cfg).eval()
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    cfg = Gemma3TextConfig(**{**gemma, "num_hidden_layers": 6, "rope_parameters": rope, **overrides})
    return Gemma3ForCausalLM(cfg).eval()


# --- llama.cpp --------------------------------------------------------------------------------------------------------

def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip('llama-cpp-python is missing: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e ".[dev]"')
    return module


@contextlib.contextmanager
def llama(path, lora: str | None = None, f32_kv: bool = False, n_ctx: int = 256):
    """llama.cpp on one GGUF; its default KV cache is f16, `f32_kv` keeps it in f32 (GGML type 0)."""
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}
    llm = llama_cpp().Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, logits_all=True,
                            n_threads=2, flash_attn=False, verbose=False, **kv)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int = 16) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int = 16) -> list[int]:
    """Plain argmax, no end-of-sequence handling: llama_greedy does the same."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)


# --- layout and metadata (no llama.cpp needed) ------------------------------------------------------------------------

def test_gguf_types_agree_with_config() -> None:
    assert tuple(WRITER_TYPES) == GGUF_TYPES


def test_qk_permutation_interleaves_each_heads_halves() -> None:
    rows = torch.arange(8.0)[:, None]  # 2 heads of dimension 4: per head [x0, x1, y0, y1]
    assert permute_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_file_layout_types_and_tokenizer(tmp_path, tokenizer) -> None:
    model = tiny("qwen2", tie_word_embeddings=True)
    for gguf_type in GGUF_TYPES:
        write_gguf(model, tokenizer, tmp_path / f"m-{gguf_type}.gguf", gguf_type=gguf_type, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted(f"m-{t}.gguf" for t in GGUF_TYPES)  # no temporary files left
    assert (tmp_path / "m-f16.gguf").stat().st_mode & 0o044  # readable by others, unlike mkstemp's default

    reader = gguf.GGUFReader(tmp_path / "m-q4_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "Q8_0"  # the output projection stays 8-bit in a q4_0 file
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_q.bias"] == "F32"
    assert types["blk.1.ffn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.to")}
    assert fields["general.architecture"] == "qwen2" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["qwen2.attention.head_count"] == 4 and fields["qwen2.attention.head_count_kv"] == 2
    assert fields["qwen2.context_length"] == 256 and fields["qwen2.rope.freq_base"] == 10000.0
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[1] == "<|im_start|>" and tokens[-1] == f"[PAD{VOCAB - 1}]"

    sizes = {t: (tmp_path / f"m-{t}.gguf").stat().st_size for t in GGUF_TYPES}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q4_0"]
    # a row length that is not a whole number of 32-blocks falls back to f16
    odd = tiny("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    write_gguf(odd, tokenizer, tmp_path / "odd.gguf", gguf_type="q8_0", progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "odd.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # 48 vs 128 columns


def test_unsupported_models_fail_with_the_supported_list(tmp_path, tokenizer) -> None:
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ExportError, match="supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, "
                                          "phi3, gpt2"):
        write_gguf(BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)),
                   tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="activation 'gelu'"):
        write_gguf(tiny("llama", hidden_act="gelu"), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="rope type 'yarn'"):
        write_gguf(tiny("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                                  "original_max_position_embeddings": 128}),
                   tokenizer, tmp_path / "x.gguf")
    odd_pre = make_tokenizer("gpt-2", vocab=300)
    state = json.loads(odd_pre.backend_tokenizer.to_str())
    state["pre_tokenizer"] = {"type": "Whitespace"}
    from tokenizers import Tokenizer

    odd_pre = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)))
    with pytest.raises(ExportError, match="pre-tokenizer"):
        write_gguf(tiny("llama"), odd_pre, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="Unknown GGUF type 'q3_k'"):
        write_gguf(tiny("llama"), tokenizer, tmp_path / "x.gguf", gguf_type="q3_k")
    assert not list(tmp_path.iterdir())


# --- llama.cpp runs the files -----------------------------------------------------------------------------------------

def test_gemma_settings_llama_cpp_would_ignore_are_refused(tmp_path, tokenizer) -> None:
    """llama.cpp fixes Gemma's query scale, layer pattern and soft-caps rather than reading them from the file."""
    for arch, overrides, match in [("gemma2", dict(query_pre_attn_scalar=64), "query_pre_attn_scalar=64"),
                                   ("gemma2", dict(attn_logit_softcapping=None), "always soft-caps"),
                                   ("gemma3", dict(layer_types=["sliding_attention"] * 6), "last layer of every 6"),
                                   ("gemma3", dict(final_logit_softcapping=30.0), "does not soft-cap")]:
        with pytest.raises(ExportError, match=match):
            write_gguf(tiny(arch, **overrides), tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


GELU_ARCHS = ("gpt2", "gemma", "gemma2", "gemma3")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2"])
def test_llama_cpp_matches_transformers(tmp_path, tokenizer, arch) -> None:
    model = tiny(arch)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f32", progress=False)
    ids = prompt_ids(tokenizer)
    expected = hf_logits(model, ids)
    with llama(path, f32_kv=True) as llm:
        exact = np.abs(llama_logits(llm, ids) - expected).max()
    with llama(path) as llm:
        diff = np.abs(llama_logits(llm, ids) - expected).max()
        print(f"{arch}: max |llama.cpp - transformers| logit = {diff:.2e} with f16 KV cache, {exact:.2e} with f32")
        # gelu (GPT-2, Gemma): llama.cpp's CPU kernel reads it from an f16 table, ~1e-3 off even with an f32 cache;
        # transformers with that same table gelu is within ~1e-4 of llama.cpp
        assert diff <= 1e-2 and exact <= (5e-3 if arch in GELU_ARCHS else 1e-4)
        assert llama_greedy(llm, ids) == hf_greedy(model, ids)


def test_llama_biases_reach_llama_cpp_with_the_qk_permutation(tmp_path, tokenizer) -> None:
    """Llama with attention_bias / mlp_bias: the q/k biases are permuted like their rows."""
    model = tiny("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f32", progress=False)
    ids = prompt_ids(tokenizer)
    with llama(path, f32_kv=True) as llm:
        assert np.abs(llama_logits(llm, ids) - hf_logits(model, ids)).max() <= 1e-4


def test_llama3_rope_scaling_and_head_dim(tmp_path, tokenizer) -> None:
    """Llama 3.1's rope_freqs and a head_dim that is not hidden / heads reach llama.cpp intact."""
    model = tiny("llama", head_dim=32, max_position_embeddings=512,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64})
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f32", progress=False)
    ids = prompt_ids(tokenizer) * 4  # past the original context, where the scaling matters
    with llama(path) as llm:
        assert np.abs(llama_logits(llm, ids) - hf_logits(model, ids)).max() <= 1e-2


def test_phi3_longrope_in_both_regimes(tmp_path, tokenizer) -> None:
    """Phi-3.5 / Phi-4-mini's LongRoPE: short factors while the context fits the original length, long ones past it
    (transformers switches by sequence length, llama.cpp by n_ctx: each side is run where both pick the same set)."""
    rng = np.random.default_rng(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": (1 + rng.random(4)).tolist(), "long_factor": (1 + 4 * rng.random(4)).tolist()}
    model = tiny("phi3", max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters=rope)
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type="f32", progress=False)
    short, long = prompt_ids(tokenizer), (prompt_ids(tokenizer) * 13)[:300]
    for ids, n_ctx in [(short, 256), (long, 512)]:
        with llama(path, f32_kv=True, n_ctx=n_ctx) as llm:
            assert np.abs(llama_logits(llm, ids) - hf_logits(model, ids)).max() <= 1e-4, n_ctx


TEXTS = (MIXED, "x = 1234567 + 89;\r\n\n\tDON'T they've", "  leading spaces and trailing  ")


@pytest.mark.parametrize("pre", ["gpt-2", "starcoder", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_transformers(tmp_path, pre) -> None:
    tok = make_tokenizer(pre)
    path = write_gguf(tiny("llama"), tok, tmp_path / "m.gguf", progress=False)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    with llama(path) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids, text
        assert llm.detokenize(tok(MIXED).input_ids, special=True).decode() == MIXED


def test_sentencepiece_style_tokenizers_tokenize_like_transformers(tmp_path, caplog) -> None:
    """Llama 2's layout (byte fallback, "▁" from a normalizer) is exact; Mistral's Metaspace layout differs in
    llama.cpp after special tokens and before a leading space, which the export warns about."""
    tok = make_sentencepiece_tokenizer("normalizer")
    assert tok.tokenize("龘") == ["\u2581", "<0xE9>", "<0xBE>", "<0x98>"]  # unseen characters fall back to bytes
    path = write_gguf(tiny("llama"), tok, tmp_path / "m.gguf", gguf_type="f32", progress=False)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_bos_token"].contents()
    with llama(path) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text
        ids = prompt_ids(tok)
        assert llama_greedy(llm, ids) == hf_greedy(tiny("llama"), ids)
    assert "Metaspace" not in caplog.text

    tok = make_sentencepiece_tokenizer("metaspace")
    path = write_gguf(tiny("llama"), tok, tmp_path / "mistral.gguf", progress=False)
    assert "tokenize slightly differently in llama.cpp" in caplog.text
    with llama(path) as llm:
        for text in ("Hello world! It's 12345 apples, 你好，世界。😀🎉", TEXTS[1]):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text


def decoded_copy(model, path) -> torch.nn.Module:
    """`model` holding the weights as the GGUF file stores them (decoded by the gguf package, q/k rows un-permuted)."""
    from peftkit.export.gguf import TensorNames

    names, c = TensorNames(model.config), model.config
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
              for t in gguf.GGUFReader(path).tensors}
    state = {}
    for key in model.state_dict():
        name = names.gguf_name(key)
        w = torch.from_numpy(np.array(stored[name], dtype=np.float32))
        heads = {".attn_q.": c.num_attention_heads, ".attn_k.": c.num_key_value_heads}
        for part, n in heads.items():
            if part in name:  # back from [x0, y0, x1, y1] to [x0, x1, y0, y1] per head
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        state[key] = w
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_exports_generate_sensibly(tmp_path, tokenizer, gguf_type) -> None:
    """llama.cpp computes with the quantized weights we wrote (against transformers holding the same decoded
    weights); q8_0 also stays close to the original model. q4_0 on a random model loses much more (reported)."""
    model = tiny("llama")
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type=gguf_type, progress=False)
    ids = prompt_ids(tokenizer)
    with llama(path) as llm:
        ll = llama_logits(llm, ids)
    decoded, original = hf_logits(decoded_copy(model, path), ids), hf_logits(model, ids)
    corr = np.corrcoef(ll.ravel(), decoded.ravel())[0, 1]
    assert corr > 0.9995  # what remains is llama.cpp quantizing activations to 8 bits for the matmuls
    agree, corr_orig = (ll.argmax(-1) == original.argmax(-1)).mean(), np.corrcoef(ll.ravel(), original.ravel())[0, 1]
    print(f"{gguf_type}: vs the same decoded weights: correlation {corr:.5f}, max diff "
          f"{np.abs(ll - decoded).max():.3f}; vs the original model: top-1 agreement {agree:.0%}, "
          f"correlation {corr_orig:.4f}")
    if gguf_type != "q4_0":
        assert corr_orig > 0.999 and agree >= 0.9


# --- LoRA as GGUF -----------------------------------------------------------------------------------------------------

def _lora_adapter(tmp_path, arch: str, **lora) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    """A base folder, an adapter with clearly non-zero B, the base model and the merged model."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny(arch).save_pretrained(base_dir)
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules="all-linear", **lora))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    tuned.save(adapter_dir)
    merged = tuned.eval().merge_and_unload()
    return base_dir, adapter_dir, AutoModelForCausalLM.from_pretrained(base_dir).eval(), merged


@pytest.mark.parametrize("arch,lora", [("llama", dict(r=4, lora_alpha=8)), ("llama", dict(r=8, use_rslora=True)),
                                       ("qwen2", dict(r=4)), ("gpt2", dict(r=4)),
                                       ("phi3", dict(r=4)),  # LoRA on the fused qkv_proj and gate_up_proj
                                       ("gemma3", dict(r=4))])
def test_gguf_lora_applied_by_llama_cpp_equals_merged(tmp_path, tokenizer, arch, lora) -> None:
    base_dir, adapter_dir, base, merged = _lora_adapter(tmp_path, arch, **lora)
    base_gguf = write_gguf(base, tokenizer, tmp_path / "base.gguf", gguf_type="f32", progress=False)
    lora_gguf = write_gguf_lora(base.config, adapter_dir, tmp_path / "lora.gguf", gguf_type="f32", progress=False)
    merged_gguf = write_gguf(merged, tokenizer, tmp_path / "merged.gguf", gguf_type="f32", progress=False)
    fields = gguf.GGUFReader(lora_gguf).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    ids = prompt_ids(tokenizer)
    with llama(base_gguf, lora=lora_gguf) as llm:
        with_lora, greedy = llama_logits(llm, ids), llama_greedy(llm, ids)
    with llama(merged_gguf) as llm:
        merged_logits = llama_logits(llm, ids)
        assert greedy == llama_greedy(llm, ids) == hf_greedy(merged, ids)
    assert np.abs(with_lora - merged_logits).max() <= 5e-3  # base + LoRA GGUF is the merged GGUF (f16 KV cache)
    assert np.abs(hf_logits(base, ids) - hf_logits(merged, ids)).max() > 0.1  # and the adapter matters


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tmp_path) -> None:
    from peftkit import Ia3Config

    base_dir = tmp_path / "base"
    tiny("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for name, config, match in [("dora", LoraConfig(r=4, use_dora=True), "DoRA"),
                                ("ia3", Ia3Config(), "plain LoRA adapters only"),
                                ("saved", LoraConfig(r=4, modules_to_save=["lm_head"]), "not LoRA A/B")]:
        TunedModel(AutoModelForCausalLM.from_pretrained(base_dir), config).save(tmp_path / name)
        with pytest.raises(ExportError, match=match):
            write_gguf_lora(base.config, tmp_path / name, tmp_path / f"{name}.gguf")
    tied = tiny("llama", tie_word_embeddings=True)
    TunedModel(tied, LoraConfig(r=4, target_modules=["lm_head"])).save(tmp_path / "head")
    with pytest.raises(ExportError, match="ties to its embeddings"):
        write_gguf_lora(tied.config, tmp_path / "head", tmp_path / "head.gguf")
    with pytest.raises(ExportError, match="f32, f16, bf16, q8_0"):
        write_gguf_lora(base.config, tmp_path / "dora", tmp_path / "x.gguf", gguf_type="q4_0")


# --- the command line -------------------------------------------------------------------------------------------------

def test_cli_exports_gguf_and_gguf_lora(tmp_path, capsys) -> None:
    base_dir, adapter_dir, _, merged = _lora_adapter(tmp_path, "llama", r=4)
    tokenizer = make_tokenizer("gpt-2")
    tokenizer.save_pretrained(base_dir)
    common = [f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}"]
    assert main(["export", *common, f"export_dir={tmp_path / 'gguf'}", "export_format=gguf",
                 "export_gguf_type=f32"]) == 0
    assert "Wrote the merged model (gguf)" in capsys.readouterr().out
    assert main(["export", *common, f"export_dir={tmp_path / 'lora'}", "export_format=gguf_lora",
                 "export_gguf_type=f32"]) == 0
    assert "--lora" in capsys.readouterr().out
    assert main(["export", f"model_name_or_path={base_dir}", f"export_dir={tmp_path / 'base'}-gguf",
                 "export_format=gguf", "export_gguf_type=f32"]) == 0
    ids = prompt_ids(tokenizer)
    with llama(tmp_path / "gguf" / "model-f32.gguf") as llm:
        assert np.abs(llama_logits(llm, ids) - hf_logits(merged, ids)).max() <= 1e-2
        merged_greedy = llama_greedy(llm, ids)
    with llama(tmp_path / "base-gguf" / "model-f32.gguf", lora=tmp_path / "lora" / "adapter-f32.gguf") as llm:
        assert llama_greedy(llm, ids) == merged_greedy

    # an existing export is kept unless overwrite_output_dir; a bad type is a one-line error
    assert main(["export", *common, f"export_dir={tmp_path / 'gguf'}", "export_format=gguf"]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", *common, f"export_dir={tmp_path / 'x'}", "export_gguf_type=q5"]) == 1
    assert "export_gguf_type" in capsys.readouterr().err


# --- the real model: smollm2-135m with a trained LoRA -----------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_with_trained_lora_runs_in_llama_cpp(smollm2, tmp_path, monkeypatch, capsys) -> None:
    from peftkit.models import load_model_and_tokenizer

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the quickstart config names examples/data
    adapter = tmp_path / "adapter"
    assert main(["train", "examples/quickstart.yaml", f"output_dir={adapter}", "max_steps=8", "plot_loss=false",
                 "logging_steps=4"]) == 0
    common = [f"model_name_or_path={smollm2}", f"adapter_name_or_path={adapter}"]
    for name, fmt, gguf_type, with_adapter in [("f32", "gguf", "f32", True), ("q8_0", "gguf", "q8_0", True),
                                               ("lora", "gguf_lora", "f32", True), ("base", "gguf", "f32", False)]:
        args = common if with_adapter else common[:1]
        assert main(["export", *args, f"export_dir={tmp_path / name}", f"export_format={fmt}",
                     f"export_gguf_type={gguf_type}"]) == 0
    capsys.readouterr()

    model, tokenizer = load_model_and_tokenizer(smollm2, dtype="float32")
    merged = TunedModel.load(model, adapter).merge_and_unload().eval()
    ids = prompt_ids(tokenizer)
    expected = hf_logits(merged, ids)
    with llama(tmp_path / "f32" / "model-f32.gguf", f32_kv=True) as llm:
        exact = np.abs(llama_logits(llm, ids) - expected).max()
    with llama(tmp_path / "f32" / "model-f32.gguf") as llm:
        diff = np.abs(llama_logits(llm, ids) - expected).max()
        greedy = llama_greedy(llm, ids)
        assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == tokenizer(MIXED).input_ids
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    print(f"smollm2-135m + LoRA, f32 GGUF: max |llama.cpp - transformers| logit = {diff:.2e} with llama.cpp's "
          f"default f16 KV cache, {exact:.2e} with an f32 KV cache (logits span {np.ptp(expected):.1f})")
    # The export itself is exact to float32 rounding; the f16 KV cache alone adds ~1e-3 of the logit range.
    assert exact <= 1e-3 and diff <= 0.1
    assert greedy == hf_greedy(merged, ids)

    with llama(tmp_path / "base" / "model-f32.gguf", lora=tmp_path / "lora" / "adapter-f32.gguf") as llm:
        assert llama_greedy(llm, ids) == greedy  # base GGUF + LoRA GGUF = merged

    with llama(tmp_path / "q8_0" / "model-q8_0.gguf") as llm:
        q8, q8_greedy = llama_logits(llm, ids), llama_greedy(llm, ids)
    hf = hf_logits(merged, ids)
    top1 = (q8.argmax(-1) == hf.argmax(-1)).mean()
    same = next((i for i, (a, b) in enumerate(zip(q8_greedy, greedy)) if a != b), len(greedy))
    print(f"q8_0 GGUF: top-1 agreement with transformers {top1:.0%} over {len(ids)} positions, max logit diff "
          f"{np.abs(q8 - hf).max():.3f}; greedy identical for the first {same} of 16 tokens: "
          f"{tokenizer.decode(q8_greedy)!r}")
    assert top1 >= 0.9 and same >= 8


def test_export_follows_the_template_the_adapter_was_trained_with(tmp_path, capsys) -> None:
    """train_config.json beside the adapter says template: qwen (ChatML with Qwen's default system); the tokenizer's
    own template is ChatML without one."""
    base_dir, adapter_dir, _, _ = _lora_adapter(tmp_path, "llama", r=4)
    make_tokenizer("gpt-2").save_pretrained(base_dir)
    (adapter_dir / "train_config.json").write_text(json.dumps({"template": "qwen"}))
    out = tmp_path / "ollama"
    assert main(["export", f"model_name_or_path={base_dir}", f"adapter_name_or_path={adapter_dir}",
                 f"export_dir={out}", "export_format=ollama"]) == 0
    printed = capsys.readouterr().out
    assert "trained with template 'qwen'" in printed and "ollama create ollama -f" in printed
    assert "You are Qwen, created by Alibaba Cloud." in (out / "Modelfile").read_text()
