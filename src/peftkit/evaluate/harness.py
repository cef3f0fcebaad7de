"""lm-evaluation-harness's model type `peftkit`: any harness task on a base model, with or without a peftkit adapter.

    lm_eval --model peftkit --model_args pretrained=M,adapter=DIR --tasks ...   (as `peftkit lm-eval ...`)

lm-eval 0.4 finds model types only in its own registry (no entry points), so importing this module registers `peftkit`
there; `peftkit lm-eval` imports it, then hands its arguments to lm-eval's own command line. Requests are tokenized and
windowed as lm-eval's `hf` model does (`TemplateLM`: trailing context spaces move to the continuation, an empty
context is the BOS/EOS token; rolling windows of `max_length` with that prefix token), so scores compare with `hf`'s.
Generation runs on peftkit's engine (`serve`), as `peftkit chat` and `predict` do.

This module imports lm_eval at the top: import it only where lm-eval is wanted (it is an optional dependency).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (fills the registry's own entries first: a registry holding only ours stays lazy)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, resolve_max_length
from tqdm.auto import tqdm

from ..data import get_template
from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..models import parse_dtype
from ..objectives.fused_head import fusable_head, hidden_instead_of_logits, linear_log_probs
from ..quantization import QuantizationConfig, trained_quantization
from ..serve import ChatEngine, GenerationParams
from ..tuned import load_for_inference

logger = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]  # (cache key or None, context ids, continuation ids)
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample")  # what the engine takes


def _batch_size(value: Any) -> int:
    """lm-eval's batch_size: a number, or "auto" (taken as 16: batches here are not sized by trial)."""
    if isinstance(value, str) and value.startswith("auto"):
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a number or auto, got {value!r}.") from None
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {size}.")
    return size


def _device(asked: str | None) -> torch.device:
    """lm-eval's `--device` (its default is cuda): a GPU when there is one, else the CPU, as its `hf` model falls
    back."""
    device = torch.device(asked) if asked else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("Device %s is not available here: running on the CPU.", asked)
        return torch.device("cpu")
    return device


@register_model("peftkit")
class PeftkitLM(TemplateLM):
    """A peftkit model as an lm-eval LM. Model args: pretrained (hub id, folder or alias; or a loaded model, with
    `tokenizer`), adapter (folder), dtype (float32 by default, so scores are exact), batch_size, max_length,
    quantization_bit (4 or 8; default: as the adapter was trained), template (for --apply_chat_template; default the
    tokenizer's own), trust_remote_code."""

    def __init__(self, pretrained: Any = None, adapter: str | None = None, dtype: str = "float32",
                 batch_size: Any = 1, max_length: int | None = None, quantization_bit: int | None = None,
                 template: str | None = None, trust_remote_code: bool = False, device: str | None = None,
                 tokenizer: Any = None, max_batch_size: Any = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            logger.warning("peftkit model type: ignoring model args %s.", ", ".join(sorted(unused)))
        if pretrained is None:
            raise ConfigError("The peftkit model type needs pretrained: --model_args pretrained=MODEL[,adapter=DIR].")
        if isinstance(pretrained, str):
            quantization = (QuantizationConfig(int(quantization_bit)) if quantization_bit
                            else trained_quantization(adapter))
            model, tokenizer = load_for_inference(pretrained, adapter, quantization=quantization,
                                                  trust_remote_code=bool(trust_remote_code))
            if quantization is None:
                if str(dtype) != "auto":
                    model = model.to(parse_dtype(str(dtype)))
                model = model.to(_device(device))
        else:
            if tokenizer is None:
                raise ConfigError("A loaded model passed as pretrained needs its tokenizer too.")
            model = pretrained.eval()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length) if max_length else resolve_max_length(
            getattr(model, "config", None), tokenizer, default=2048)
        self.max_gen_toks = 256
        self.template_name = template
        self._pretrained = pretrained if isinstance(pretrained, str) else getattr(tokenizer, "name_or_path", "")
        self._engine: ChatEngine | None = None

    # --- tokens ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS (as lm-eval's `hf`)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self._pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """The tokenizer's own special tokens unless told otherwise, none when the text already starts with BOS."""
        bos = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **extra)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --- scores ---
    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded batch of (context, continuation) ids: the continuation's summed log-probability and
        whether greedy decoding would write it. The log-probabilities come from the arithmetic training uses
        (`objectives.fused_head`: the output layer on the kept hidden states, softmax in float32; or the model's
        logits where that layer cannot be fused), so they agree with peftkit's own `token_outputs`."""
        inputs, spans = [], []
        for context, continuation in pairs:
            window = (context + continuation)[-(self.max_length + 1):]  # too long: cut from the left, as `hf`
            end = len(window) - 1  # positions end - len(continuation) .. end - 1 predict the continuation
            # the last token predicts nothing; it stays where it fits, so the sequence is the one training scores
            inputs.append(window if len(window) <= self.max_length else window[:-1])
            spans.append((end - len(continuation), end))
        width = max(len(ids) for ids in inputs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, ids in enumerate(inputs):
            batch[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
        keep = torch.unique(torch.cat([torch.arange(a, b) for a, b in spans]))  # only where a continuation is
        device = next(self.model.parameters()).device
        rows = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(spans)]).to(device)
        cols = torch.cat([torch.searchsorted(keep, torch.arange(a, b)) for a, b in spans]).to(device)
        targets = torch.tensor([t for _, continuation in pairs for t in continuation], device=device)
        kw = dict(input_ids=batch.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                  use_cache=False)
        head = fusable_head(self.model)
        if head is not None:
            with hidden_instead_of_logits(self.model, head):
                hidden = self.model(**kw).logits[rows, cols]
            logps = linear_log_probs(hidden, head, targets, IGNORE_INDEX)
            greedy = head(hidden).argmax(-1) == targets
        else:
            logits = self.model(**kw).logits[rows, cols].float()
            logps = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            greedy = logits.argmax(-1) == targets
        # summed in float64: a long text's float32 sum alone would round by more than 1e-5
        sums = torch.zeros(len(pairs), dtype=torch.float64, device=device).index_add(0, rows, logps.double())
        misses = torch.zeros(len(pairs), dtype=torch.long, device=device).index_add(0, rows, (~greedy).long())
        return [(float(v), not bool(m)) for v, m in zip(sums, misses)]

    def _loglikelihood_tokens(self, requests: Sequence[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm, dynamic_ncols=True)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, scored in zip(chunk, self._score([(requests[i][1], requests[i][2]) for i in chunk])):
                results[i] = scored
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], scored)
            bar.update(len(chunk))
        bar.close()
        return [results[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood: windows of max_length, the first conditioned on the prefix token, every
        token predicted once (lm-eval's `get_rolling_token_windows`, as `hf` uses it)."""
        windows: list[Request] = []
        owners: list[int] = []
        for k, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, scores):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---
    @property
    def engine(self) -> ChatEngine:
        """peftkit's generation engine; the raw prompts need no template, `empty` only supplies the stop tokens."""
        if self._engine is None:
            self._engine = ChatEngine(self.model, self.tokenizer, "empty")
        return self._engine

    def _params(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationParams, list[str]]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id],
                                                                                     skip_special_tokens=False))
        max_new = kwargs.pop("max_gen_toks")
        ignored = sorted(k for k in kwargs if k not in GENERATION_KEYS)
        if ignored:
            logger.warning("peftkit model type: ignoring generation kwargs %s.", ", ".join(ignored))
        settings = {k: kwargs[k] for k in GENERATION_KEYS if kwargs.get(k) is not None}
        return GenerationParams(max_new_tokens=max_new, stop=tuple(s for s in until if s), **settings), until

    def _generate(self, prompts: list[list[int]], params: GenerationParams) -> list[str]:
        """The decode loop's tokens, decoded as they are (the engine's Completion text is stripped, lm-eval's is not);
        models it does not cover generate through `ChatEngine.generate`."""
        engine = self.engine
        with engine.lock:
            model, context = engine.use(engine.default_adapter)
            rows = engine.rows(prompts, params, model)
            if rows is None:
                return [done.text for done in engine.generate(prompts, params, engine.default_adapter)]
            with context:
                engine.decoder(model).run(rows)
        texts = []
        for row in rows:
            end = next((k for k, t in enumerate(row.tokens) if t in engine.stop_ids), len(row.tokens))
            texts.append(self.tok_decode(row.tokens[:end]))
        return texts

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) up to `max_gen_toks` tokens, cut at the first `until` string;
        requests with the same settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
        results: dict[int, str] = {}
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, dynamic_ncols=True)
        for members in groups.values():
            params, until = self._params(requests[members[0]].args[1])
            room = self.max_length - params.max_new_tokens
            if room < 1:
                raise ConfigError(f"max_gen_toks ({params.max_new_tokens}) must be below max_length "
                                  f"({self.max_length}).")
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in chunk]
                for i, text in zip(chunk, self._generate(prompts, params)):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [results[i] for i in range(len(requests))]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """--apply_chat_template: peftkit's template (model arg `template`, else the tokenizer's own)."""
        template = get_template(self.template_name, self.tokenizer)
        return template.render(chat_history, self.tokenizer, add_generation_prompt=add_generation_prompt)


def run_harness_cli(argv: Sequence[str]) -> int:
    """lm-eval's own command line on `argv` (it reads sys.argv), with `peftkit` registered; its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
