"""`peftkit` command line: parse, call the library, print. Errors print one line; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import torch
import transformers

from . import __version__
from .config import BENCHMARK_LANGS, Recipe, load_config, load_recipe
from .data.dedup import NEAR, dedup_dataset
from .data.from_predictions import describe_skips, predictions_to_alpaca
from .data.report import dataset_stats, preview
from .data.templates import check_template_name
from .errors import PeftkitError, TrainingInterrupted
from .evaluate import accuracy_table, run_benchmark, run_eval, run_predict
from .export import run_export
from .io.run_config import read_train_config
from .models import load_model_and_tokenizer, load_tokenizer, peftkit_home
from .precision import bf16_is_faster
from .quantization import QuantizationConfig, trained_quantization
from .serve import ChatEngine, GenerationParams
from .train import run_sft
from .train.distributed import free_port, launched
from .train.recipe import from_result, run_recipe
from .tuned import load_for_inference


def cmd_train(args: argparse.Namespace) -> None:
    """Train, then predict if `do_predict` (with the adapter or model just saved), as LLaMA-Factory's `train`.
    With --nproc-per-node (or FORCE_TORCHRUN=1), torchrun starts the processes and each runs this command."""
    processes = _torchrun_processes(args.nproc_per_node)
    if processes:
        code = subprocess.call(_torchrun_command(processes, args))
        if code:
            raise SystemExit(code)
        return
    loaded = load_recipe(args.config, args.overrides)
    if isinstance(loaded, Recipe):  # phases, each from the one before; the last one's result lands in output_dir
        run_recipe(loaded)
        cfg = dataclasses.replace(loaded.phases[-1], output_dir=loaded.output_dir)
        if cfg.do_predict and _rank() == 0:
            _print_predict(from_result(cfg, cfg.output_dir))
        return
    cfg = loaded
    if not (cfg.do_train or cfg.do_predict):
        raise PeftkitError("Nothing to do: set dataset (to train) or do_predict: true with eval_dataset.")
    if cfg.do_train:
        run_sft(cfg)
        if cfg.do_predict:
            cfg = from_result(cfg, cfg.output_dir)  # the adapter or model just saved
    if cfg.do_predict and _rank() == 0:
        _print_predict(cfg)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _torchrun_processes(asked: int | None) -> int:
    """Processes per machine to start through torchrun: --nproc-per-node, or FORCE_TORCHRUN=1 with NPROC_PER_NODE
    (default: the GPUs, or 1), as LLaMA-Factory reads them; 0 when this process trains itself (also when torchrun or
    accelerate started it)."""
    if "LOCAL_RANK" in os.environ:
        return 0
    if asked is not None:
        if asked < 1:
            raise PeftkitError(f"--nproc-per-node must be at least 1, got {asked}.")
        return asked
    if os.environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "yes"):
        return int(os.environ.get("NPROC_PER_NODE") or max(torch.cuda.device_count(), 1))
    return 0


def _torchrun_command(processes: int, args: argparse.Namespace) -> list[str]:
    """torchrun running `peftkit train` on this machine's share of the processes; NNODES, NODE_RANK, MASTER_ADDR and
    MASTER_PORT place it among several machines."""
    env = os.environ
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--nnodes={env.get('NNODES', '1')}", f"--node_rank={env.get('NODE_RANK', '0')}",
            f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={env.get('MASTER_PORT') or free_port()}",
            "-m", "peftkit", "train", args.config, *args.overrides]


def _print_predict(cfg: Any) -> None:
    results = run_predict(cfg)
    print(json.dumps(results, indent=2))
    print(f"Wrote {cfg.output_dir}/generated_predictions.jsonl and predict_results.json")


def cmd_predict(args: argparse.Namespace) -> None:
    _print_predict(load_config(args.config, args.overrides, do_train=False, do_predict=True))


def cmd_eval(args: argparse.Namespace) -> None:
    """Loss and perplexity on eval_dataset; with `task` set, a multiple-choice benchmark (LLaMA-Factory's eval)."""
    flags = {key: value for key, value in (("task", args.task), ("task_dir", args.task_dir), ("n_shot", args.n_shot),
                                           ("lang", args.lang)) if value is not None}
    cfg = load_config(args.config, args.overrides, do_train=False, **flags)
    if cfg.task:
        results = run_benchmark(cfg)
        print(accuracy_table(results["accuracy"]))
        print(f"Wrote {cfg.output_dir}/results.json and results.log")
        return
    print(json.dumps(run_eval(cfg), indent=2))


def cmd_lm_eval(args: argparse.Namespace) -> None:
    """lm-evaluation-harness's own command line, with the `peftkit` model type registered first."""
    try:
        from .evaluate.harness import run_harness_cli  # lm-eval is optional and heavy: imported only here
    except ImportError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise PeftkitError("peftkit lm-eval needs lm-evaluation-harness: pip install lm-eval (or "
                           "pip install 'peftkit[harness]').") from None
    code = run_harness_cli(args.args)
    if code:
        raise SystemExit(code)


def cmd_data_from_predictions(args: argparse.Namespace) -> None:
    """Sequence-level distillation: the teacher's answers as an SFT dataset for the student."""
    done = predictions_to_alpaca(args.predictions, args.output, args.name, args.use)
    skipped = sum(done.skipped.values())
    print(f"Wrote {done.written} rows to {done.path} (skipped {skipped}"
          f"{': ' + describe_skips(done.skipped) if skipped else ''}); train on it with "
          f"dataset: {done.name}, dataset_dir: {done.path.parent}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    report = dataset_stats(_data_tokenizer(args), args.dataset, args.dataset_dir, template=args.template,
                           cutoff_len=args.cutoff_len, near=args.near)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.render())


def cmd_data_preview(args: argparse.Namespace) -> None:
    shown = preview(_data_tokenizer(args), args.dataset, args.dataset_dir, template=args.template,
                    cutoff_len=args.cutoff_len, n=args.n, color=sys.stdout.isatty())
    print("\n".join(shown))


def cmd_data_dedup(args: argparse.Namespace) -> None:
    done = dedup_dataset(args.dataset, args.dataset_dir, args.output, args.name, args.near)
    kept = f"; {done.malformed} malformed rows kept as they were" if done.malformed else ""
    print(f"Wrote {done.written} of {done.rows} rows to {done.path} (dropped {len(done.duplicates.exact)} exact and "
          f"{len(done.duplicates.near)} near duplicates{kept}); train on it with dataset: {done.name}, "
          f"dataset_dir: {done.path.parent}")


def _data_tokenizer(args: argparse.Namespace) -> Any:
    """--model's tokenizer, once --template is known to exist (an alias may take seconds to load)."""
    if args.template is not None:
        check_template_name(args.template, "--template", "or leave it out to use the tokenizer's own chat template")
    return load_tokenizer(args.model)


def _dataset_options(p: argparse.ArgumentParser, *, tokenizer: bool = True) -> None:
    """The options the `data` commands that read datasets share, named as the training YAML's keys."""
    p.add_argument("dataset", metavar="DATASET", help="names in dataset_info.json (comma-separated) or data files")
    p.add_argument("--dataset-dir", default="data", help="the folder with dataset_info.json (default: data)")
    if tokenizer:
        p.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens: hub id, local "
                                                               "folder, .gguf file or alias (default: smollm2-135m)")
        p.add_argument("--template", help="LLaMA-Factory template name (default: the tokenizer's chat template)")
        p.add_argument("--cutoff-len", type=int, default=2048, help="training's cutoff_len (default: 2048)")


def _check_template_name(name: str | None) -> None:
    """A mistyped --template fails before minutes of model loading."""

    if name is not None:
        check_template_name(name, "--template", "leave --template out to use the template the adapter was trained "
                                                "with, or the tokenizer's own")


def _trained_template(folders: list[str]) -> tuple[str | None, bool]:
    """(template, enable_thinking) the adapters in `folders` were trained with, from their train_config.json; (None,
    True) when none has a record: the tokenizer's own template. One engine formats every prompt one way, so adapters
    trained with different templates need --template."""

    trained = {}
    for folder in folders:
        record = read_train_config(folder)
        if record:
            trained[folder] = (record.get("template"), bool(record.get("enable_thinking", True)))
    if len(set(trained.values())) > 1:
        listing = ", ".join(f"{folder}: {t or 'tokenizer template'}" for folder, (t, _) in trained.items())
        raise PeftkitError(f"The adapters were trained with different templates ({listing}), but one server formats "
                           "every prompt one way. Pass --template NAME, or serve them from separate servers.")
    return next(iter(trained.values()), (None, True))


def _chat_template(explicit: str | None, adapters: list[str]) -> tuple[str | None, bool]:
    """--template when given, else the adapters' training template (said on stderr, so the prompt format is no
    surprise)."""
    if explicit is not None:
        return explicit, True
    template, thinking = _trained_template(adapters)
    if template is not None:
        trained = "adapters were" if len(adapters) > 1 else "adapter was"
        print(f"Using template '{template}', as the {trained} trained (--template overrides).", file=sys.stderr)
    return template, thinking


def _load_chat_model(args: argparse.Namespace, template: str | None = None, enable_thinking: bool = True) -> Any:
    if args.quantization_bit is None:  # as the adapter was trained: QLoRA adapters run on their 4-bit base
        quantization = trained_quantization(args.adapter)
        if quantization is not None:
            print(f"Loading the base in {quantization.describe()}, as the adapter was trained "
                  "(--quantization-bit 0 loads it in full precision).", file=sys.stderr)
    else:
        quantization = (QuantizationConfig(args.quantization_bit, args.quantization_type)
                        if args.quantization_bit else None)
    return ChatEngine(*load_for_inference(args.model, args.adapter, quantization=quantization), template,
                      enable_thinking=enable_thinking)


def _read_tools(path: str) -> list[dict]:
    """--tools FILE: a JSON list of function schemas, OpenAI's ({"type": "function", "function": {...}}) or bare
    functions as LLaMA-Factory's tool data lists them ({"name", "description", "parameters"})."""
    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except OSError as e:
        raise PeftkitError(f"Cannot read --tools {path}: {e.strerror}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"--tools {path} is not valid JSON ({e}).") from None
    tools = tools if isinstance(tools, list) else [tools]
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PeftkitError(f"--tools {path} must hold a JSON list of function schemas, each with a name: "
                               '[{"name": "get_weather", "description": "...", "parameters": {...}}] (or OpenAI\'s '
                               '{"type": "function", "function": {...}}).')
    return tools


def _shown(done: Any) -> str:
    """A reply as chat prints it: its text, then each tool call as `tool call: name({arguments})`."""
    calls = [f"tool call: {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in done.tool_calls]
    return "\n".join([done.text, *calls] if done.text else calls)


def cmd_chat(args: argparse.Namespace) -> None:
    """With --tools, replies print whole (calls as `tool call: name({...})`); in the interactive chat `/tool TEXT`
    answers a call with its result, and the model goes on."""

    # checked before the model loads, so a bad setting fails at once
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    _check_template_name(args.template)
    tools = _read_tools(args.tools) if args.tools else None
    if (args.top_k is not None or args.top_p is not None) and not params.sampling:
        print("note: --top-k and --top-p shape sampling, which needs --temperature above 0 (e.g. 0.7); answers stay "
              "greedy.", file=sys.stderr)
    template, enable_thinking = _chat_template(args.template, [args.adapter] if args.adapter else [])
    engine = _load_chat_model(args, template, enable_thinking)
    gen = {"params": params, "adapter": engine.default_adapter}
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.once is not None:
        question = [*system, {"role": "user", "content": args.once}]
        print(_shown(engine.complete(question, tools=tools, **gen)) if tools else engine.reply(question, **gen))
        return
    print("Chat with the model. /clear starts over, /exit quits." +
          (" /tool TEXT answers a tool call with TEXT, the tool's result." if tools else ""), file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if query == "/exit":
            return
        if query == "/clear":
            history = []
            print("History cleared.", file=sys.stderr)
            continue
        if not query:
            continue
        if tools and query.startswith("/tool "):
            history.append({"role": "tool", "content": query.removeprefix("/tool ").strip()})
        else:
            history.append({"role": "user", "content": query})
        print("Assistant: ", end="", flush=True)
        if tools:  # whole, so that its calls can be read off it
            done = engine.complete([*system, *history], tools=tools, **gen)
            print(_shown(done))
            history.append({"role": "assistant", "content": done.text,
                            "tool_calls": [{"function": call} for call in done.tool_calls]})
            continue
        answer = ""
        for piece in engine.stream([*system, *history], **gen):
            print(piece, end="", flush=True)
            answer += piece
        print()
        history.append({"role": "assistant", "content": answer.strip()})


def cmd_export(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides, do_train=False)
    result = run_export(cfg)
    what = "merged model" if cfg.adapter_name_or_path and cfg.export_format != "gguf_lora" else "export"
    print(f"Wrote the {what} ({cfg.export_format}) to {result.path}")
    for note in result.notes:
        print(note)


def cmd_api(args: argparse.Namespace) -> None:
    from .serve.api import serve  # deferred: fastapi and uvicorn load only for `peftkit api`

    if not 0 <= args.port <= 65535:
        raise PeftkitError(f"--port must be between 0 and 65535, got {args.port}.")
    _check_template_name(args.template)
    adapters = []
    for item in args.adapter or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise PeftkitError(f"--adapter takes NAME=DIR (e.g. --adapter sql=saves/sql), got '{item}'.")
        if name == args.model:
            raise PeftkitError(f"The adapter name '{name}' is the base model's; pick another.")
        adapters.append((name, folder))
    template, enable_thinking = _chat_template(args.template, [folder for _, folder in adapters])
    quantization = QuantizationConfig(args.quantization_bit) if args.quantization_bit else None
    model, tokenizer = load_model_and_tokenizer(args.model, quantization=quantization)
    engine = ChatEngine(model, tokenizer, template, enable_thinking=enable_thinking)
    for name, folder in adapters:  # every adapter on the one base model in memory; a request's `model` picks one
        engine.load_adapter(folder, name)
    print(f"Serving {', '.join([args.model, *engine.adapters])} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(engine, args.model, host=args.host, port=args.port, api_key=args.api_key)


def cmd_webui(args: argparse.Namespace) -> None:
    from .webui import launch  # deferred: gradio loads only for `peftkit webui`

    if not 0 <= args.port <= 65535:
        raise PeftkitError(f"--port must be between 0 and 65535, got {args.port}.")
    print(f"peftkit webui at http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    launch(args.host, args.port, args.auth, output_root=args.output_root, dataset_dir=args.dataset_dir,
           model=args.model)


def cmd_env(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {
        "peftkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "bf16 faster than fp32": bf16_is_faster(device),
        "cache dir (PEFTKIT_HOME)": str(peftkit_home()),
    }
    for name in ("accelerate", "peft", "bitsandbytes", "gguf", "datasets"):
        try:
            rows[name] = version(name)
        except PackageNotFoundError:
            rows[name] = "not installed"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Fine-tune, chat with and export language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config: peftkit train cfg.yaml [key=value ...]")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--nproc-per-node", type=int, help="start N processes through torchrun (DDP, or FSDP with "
                                                      "fsdp: full_shard); NNODES, NODE_RANK, MASTER_ADDR, "
                                                      "MASTER_PORT place them among several machines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="generate answers for eval_dataset and score them (BLEU-4, ROUGE)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="eval loss and perplexity on eval_dataset, or with --task a multiple-choice "
                                    "benchmark (mmlu, cmmlu, ceval), with or without an adapter")
    p.add_argument("config", nargs="?", help="YAML config (LLaMA-Factory's eval YAML works); or only key=value")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (keep them next to the config, "
                                                "before or after the flags)")
    p.add_argument("--task", help="benchmark: mmlu, cmmlu, ceval, or LLaMA-Factory's mmlu_test, ceval_validation, ...")
    p.add_argument("--task-dir", help="folder holding <task>/mapping.json and its per-subject CSV files "
                                      "(default: evaluation)")
    p.add_argument("--n-shot", type=int, help="solved examples shown before each question (default: 5)")
    p.add_argument("--lang", choices=BENCHMARK_LANGS, help="the prompt's language (default: en)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="+",  # every argument goes to lm-eval as it is
                       help="run lm-evaluation-harness with --model peftkit --model_args pretrained=M,adapter=DIR "
                            "(lm-eval's own arguments; needs pip install lm-eval)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("data", help="dataset tools: peftkit data stats | preview | dedup | from-predictions ...")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("from-predictions", help="turn peftkit predict's generated_predictions.jsonl into an alpaca "
                                                 "dataset (plus its dataset_info.json entry) of the teacher's answers")
    p.add_argument("predictions", metavar="PRED_FILE", help="generated_predictions.jsonl written by peftkit predict")
    p.add_argument("--output", required=True, metavar="DATASET.json", help="the alpaca dataset to write; its "
                                                                          "folder's dataset_info.json gets the entry")
    p.add_argument("--name", help="the dataset's name in dataset_info.json (default: the output file's stem)")
    p.add_argument("--use", choices=("predict", "label"), default="predict",
                   help="the answer to train on: the model's prediction (default) or the dataset's label")
    p.set_defaults(func=cmd_data_from_predictions)
    p = data.add_parser("stats", help="rows, skips, turns, token lengths, truncation, duplicates and scripts")
    _dataset_options(p)
    p.add_argument("--near", type=float, default=NEAR, help=f"near-duplicate Jaccard threshold (default: {NEAR})")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("preview", help="examples rendered by the template, trained tokens marked ([[...]], or "
                                        "green on a terminal)")
    _dataset_options(p)
    p.add_argument("-n", type=int, default=3, help="examples per dataset (default: 3)")
    p.set_defaults(func=cmd_data_preview)
    p = data.add_parser("dedup", help="write the dataset without exact and near duplicates, plus its "
                                      "dataset_info.json entry")
    _dataset_options(p, tokenizer=False)
    p.add_argument("--output", required=True, metavar="OUT.json", help="the dataset to write (.json or .jsonl); its "
                                                                      "folder's dataset_info.json gets the entry")
    p.add_argument("--name", help="the dataset's name in dataset_info.json (default: the output file's stem)")
    p.add_argument("--near", type=float, default=NEAR, help=f"near-duplicate Jaccard threshold (default: {NEAR})")
    p.set_defaults(func=cmd_data_dedup)

    p = sub.add_parser("chat", help="chat with a model (and adapter)")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file or built-in alias")
    p.add_argument("--adapter", help="adapter folder (peftkit or PEFT format)")
    p.add_argument("--template", help="LLaMA-Factory template name (default: the one the adapter was trained with, "
                                      "else the tokenizer's chat template)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--once", metavar="QUESTION", help="answer one question, print only the answer, and exit")
    p.add_argument("--tools", metavar="FILE", help="offer the model these tools: a JSON list of function schemas "
                                                   "(OpenAI's or LLaMA-Factory's); its calls print as "
                                                   "'tool call: name({...})', and /tool TEXT answers one")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="when sampling: only from the most likely tokens whose "
                                                             "probabilities add up to this (0: the top one)")
    p.add_argument("--top-k", type=int, default=None,
                   help="when sampling: only from the k most likely tokens (0: no limit)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the scores of tokens already written by this (1: none; 1.1 discourages repeats)")
    p.add_argument("--quantization-bit", type=int, choices=(0, 4, 8), default=None,
                   help="load the base in 4 or 8 bits (0: full precision; default: as the adapter was trained)")
    p.add_argument("--quantization-type", choices=("nf4", "fp4"), default="nf4")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="merge an adapter into its base model and save it (hf, gguf, ollama), "
                                      "or an adapter as a GGUF LoRA")
    p.add_argument("config", nargs="?", help="YAML with model_name_or_path, adapter_name_or_path, export_dir")
    p.add_argument("overrides", nargs="*", help="key=value settings")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("api", help="serve the model and its adapters through an OpenAI-compatible API")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file or built-in alias")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter, requested as model=NAME")
    p.add_argument("--template", help="LLaMA-Factory template name (default: the one the adapters were trained "
                                      "with, else the tokenizer's chat template)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint")
    p.add_argument("--quantization-bit", type=int, choices=(4, 8), help="load the base in 4 or 8 bits")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("webui", help="train, watch, evaluate, chat and export from a browser")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASSWORD|FILE", help="require a login: user:password, or a file with one "
                                                                "user:password per line")
    p.add_argument("--output-root", default="saves", help="where runs go and are listed (default saves)")
    p.add_argument("--dataset-dir", default="data", help="the dataset directory the forms start with")
    p.add_argument("--model", help="the model the forms start with (default smollm2-135m)")
    p.set_defaults(func=cmd_webui)

    p = sub.add_parser("env", help="print versions, devices and the cache folder")
    p.set_defaults(func=cmd_env)
    return parser


def _resume_command(argv: list[str] | None, checkpoint: str) -> str:
    """The command line that continues an interrupted `peftkit train`: the same one, resuming from `checkpoint`."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("resume_from_checkpoint=", "overwrite_output_dir="))]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = ["peftkit"]
    if world > 1:  # started by torchrun: the same processes again
        nodes = [f"--nnodes={world // local}"] if world > local else []
        launcher = ["torchrun", f"--nproc_per_node={local}", *nodes, "-m", "peftkit"]
    return shlex.join([*launcher, *args, f"resume_from_checkpoint={checkpoint}"])


def _peer_gone(error: RuntimeError) -> bool:
    """Whether a collective failed because another process of a multi-process run ended (gloo and NCCL say so)."""
    peer = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")
    return launched() and (isinstance(error, torch.distributed.DistError) or any(p in str(error) for p in peer))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test or a wrapper may replace it), as logging's own last-resort
    handler does."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _show_info() -> None:
    """peftkit's own INFO lines (what each dataset gave the run, the data report) on stderr, as its warnings are."""
    logger = logging.getLogger("peftkit")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_info()
    if getattr(args, "config", None) and "=" in args.config:  # `peftkit export key=value ...` without a file
        args.overrides = [args.config, *args.overrides]
        args.config = None
    # What exists now (torch's, transformers' and peftkit's modules: ~300k objects) is never garbage while the
    # command runs; leaving it out of the cyclic collector's walks saves ~0.5 s of full collections in loading the
    # model and training the quickstart (docs/performance.md, "Garbage collection"). Given back when it returns.
    gc.freeze()
    try:
        args.func(args)
    except TrainingInterrupted as e:
        if _rank() == 0:
            print(f"{e}\nResume with: {_resume_command(argv, e.checkpoint)}", file=sys.stderr)
        return 130
    except PeftkitError as e:
        if args.debug:
            raise
        if _rank() == 0:  # every rank meets the same settings and data: rank 0 says it for all
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch.distributed's errors included
        if not _peer_gone(e):
            raise
        return 1  # another process of the run failed and printed why (torchrun's summary names it)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        gc.unfreeze()
    return 0


def console() -> None:
    """The `peftkit` command: `main`, then `exit_now`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """Exit without tearing down the interpreter's objects one by one.

    atexit handlers (temporary folders, logging) still run; only the final garbage collection of the model's modules
    and tensors is skipped, which takes 1-2 s after a run (docs/performance.md, "start-up and exit").
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
