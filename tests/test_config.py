"""Config loading: LLaMA-Factory's YAML loads, overrides win, and every bad value fails early with a helpful message."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import LLAMA_FACTORY_EXAMPLE

from peftkit import ConfigError, LoraConfig
from peftkit.config import IGNORED_KEYS, TrainConfig, load_config, parse_overrides

BASE = ["model_name_or_path=local/model", "dataset=alpaca_en_demo"]


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    text = LLAMA_FACTORY_EXAMPLE.replace("meta-llama/Meta-Llama-3-8B-Instruct", str(tmp_path / "model")).replace(
        "cutoff_len:", f"dataset_dir: {tmp_path / 'data'}\ncutoff_len:")
    path.write_text(text)
    return path


def cfg_from(*overrides: str, **kw) -> TrainConfig:
    return load_config(None, [*BASE, *overrides], **kw)


def test_llama_factory_example_loads(example, tmp_path) -> None:
    cfg = load_config(example)
    assert cfg.ddp_timeout == 180000000  # read: how long a process of a multi-process run waits for the others
    assert cfg.model_name_or_path == str(tmp_path / "model")
    assert cfg.dataset == ["identity", "alpaca_en_demo"]
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert (cfg.gradient_accumulation_steps, cfg.preprocessing_num_workers, cfg.dataloader_num_workers) == (8, 16, 4)
    assert ((cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.bf16, cfg.resume_from_checkpoint)
            == ("cosine", 0.1, True, None))
    assert cfg.trust_remote_code and cfg.plot_loss and cfg.overwrite_output_dir and not cfg.save_only_model
    assert (cfg.template, cfg.max_samples, cfg.report_to, cfg.eval_strategy) == ("llama3", 1000, "none", "no")
    method = cfg.method_config()
    assert isinstance(method, LoraConfig)
    assert (method.r, method.lora_alpha, method.target_modules) == (8, 16, "all-linear")


def test_overrides_win_over_file_and_keywords_over_overrides(example) -> None:
    cfg = load_config(example, ["learning_rate=5e-5", "lora_target=q_proj,v_proj", "packing=true", "seed=1"], seed=2)
    assert cfg.learning_rate == 5e-5 and cfg.packing is True and cfg.seed == 2
    assert cfg.method_config().target_modules == ["q_proj", "v_proj"]


def test_parse_overrides() -> None:
    got = parse_overrides(["learning_rate=5e-5", "packing=true", "dataset=[a, b]", "--seed=3", "template=", "x=a=b"])
    assert got == {"learning_rate": "5e-5", "packing": True, "dataset": ["a", "b"], "seed": 3, "template": None,
                   "x": "a=b"}
    for bad in ("learning_rate", "=5", "learning rate=5"):
        with pytest.raises(ConfigError, match="not key=value"):
            parse_overrides([bad])


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nlearning_rate: 5e-5\nadam_epsilon: '1e-6'\nsave_steps: 100.0\n")
    cfg = load_config(path)
    assert (cfg.learning_rate, cfg.adam_epsilon, cfg.save_steps) == (5e-5, 1e-6, 100)
    assert isinstance(cfg.save_steps, int)


@pytest.mark.parametrize("item, message", [
    ("learning_rat=1e-4", "Unknown key 'learning_rat'. Did you mean 'learning_rate'?"),
    ("lora_rnak=8", "Did you mean 'lora_rank'?"),
    ("zzzzzz=1", "Unknown key 'zzzzzz'"),
])
def test_unknown_key_names_the_closest(item, message) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_from(item)
    assert message in str(e.value)


def test_unknown_key_in_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nper_device_train_batchsize: 2\n")
    with pytest.raises(ConfigError, match="Did you mean 'per_device_train_batch_size'"):
        load_config(path)


@pytest.mark.parametrize("item, message", [
    ("learning_rate=abc", "learning_rate must be a number, got 'abc'"),
    ("learning_rate=true", "learning_rate must be a number, got True"),
    ("lora_rank=2.5", "lora_rank must be an integer, got 2.5"),
    ("lora_rank=true", "lora_rank must be an integer, got True"),
    ("packing=maybe", "packing must be true or false or null, got 'maybe'"),
    ("packing=1", "packing must be true or false or null, got 1"),
    ("dataset={a: 1}", "dataset must be a list of strings"),
    ("template=[a]", "template must be a string or null"),
    ("lr_scheduler_kwargs=5", "lr_scheduler_kwargs must be a mapping"),
    ("eval_steps=ten", "eval_steps must be an integer or null, got 'ten'"),
])
def test_wrong_types(item, message) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_from(item)
    assert message in str(e.value)


@pytest.mark.parametrize("items, message", [
    (["learning_rate=0"], "learning_rate must be greater than 0"),
    (["learning_rate=-1e-4"], "learning_rate must be greater than 0"),
    (["per_device_train_batch_size=0"], "per_device_train_batch_size must be at least 1"),
    (["per_device_eval_batch_size=0"], "per_device_eval_batch_size must be at least 1"),
    (["gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    (["warmup_ratio=1.5"], "warmup_ratio must be in [0, 1]"),
    (["warmup_ratio=-0.1"], "warmup_ratio must be in [0, 1]"),
    (["cutoff_len=0"], "cutoff_len must be at least 1"),
    (["lora_rank=0"], "lora_rank must be at least 1"),
    (["lora_dropout=1.0"], "lora_dropout must be in [0, 1)"),
    (["lora_dropout=-0.1"], "lora_dropout must be in [0, 1)"),
    (["num_train_epochs=0", "max_steps=-1"], "Nothing to train"),
    (["lr_scheduler_type=cosin"], "Did you mean 'cosine'?"),
    (["lr_scheduler_type=warmup_stable_decay"], "constant, constant_with_warmup, linear, cosine"),
    (["save_total_limit=0"], "save_total_limit must be at least 1"),
    (["val_size=-0.1"], "val_size must be a fraction in [0, 1) or a count >= 1"),
    (["val_size=1.5"], "val_size must be a fraction in [0, 1) or a count >= 1"),
    (["eval_strategy=step"], "Did you mean 'steps'?"),
    (["save_strategy=always"], "save_strategy 'always' is not one of"),
    (["load_best_model_at_end=true", "eval_strategy=steps"], "load_best_model_at_end needs an evaluation set"),
    (["load_best_model_at_end=true", "val_size=0.1"], "set eval_strategy"),
    (["bf16=true", "fp16=true"], "choose one"),
    (["dataset=", "do_train=true"], "do_train needs a dataset"),
    (["model_name_or_path="], "model_name_or_path is required"),
    (["stage=ppo"], "stage ppo needs reward_model"),
    (["stage=ppo", "reward_model=saves/rm", "reward_model_type=api"], "needs reward_model to be an http(s) URL"),
    (["stage=ppo", "reward_model=saves/rm", "ppo_epochs=0"], "ppo_epochs must be at least 1"),
    (["stage=grpo", "reward_funcs=accuracy", "num_generations=1"], "num_generations must be at least 2"),
    (["stage=grpo", "reward_funcs=accuracy", "packing=true"], "packing: true cannot be used with stage 'grpo'"),
    (["stage=grpo", "reward_funcs=accuracy", "loss_type=sapo"], "loss_type 'sapo' is not one of"),
    (["stage=sfft"], "supported here: dpo, grpo, kd, kto, ppo, pt, rm, sft"),
    (["stage=kd"], "stage kd needs teacher_model_name_or_path"),
    (["stage=kd", "teacher_model_name_or_path=t", "kd_alpha=2"], "kd_alpha must be in [0, 1]"),
    (["stage=kd", "teacher_model_name_or_path=t", "kd_top_k=-1"], "kd_top_k must be 0"),
    (["stage=dpo", "packing=true"], "packing: true cannot be used with stage 'dpo'"),
    (["stage=rm", "packing=true"], "packing: true cannot be used with stage 'rm'"),
    (["stage=dpo", "pref_loss=orpo", "ref_model=m"], "pref_loss: orpo is reference-free"),
    (["stage=rm", "ref_model=m"], "stage 'rm' has no reference model"),
    (["stage=kto", "ref_model_adapters=a"], "ref_model_adapters needs ref_model"),
    (["stage=dpo", "pref_beta=0"], "pref_beta must be greater than 0"),
    (["stage=dpo", "dpo_label_smoothing=0.5"], "dpo_label_smoothing must be in [0, 0.5)"),
    (["stage=dpo", "pref_loss=dpo"], "pref_loss 'dpo' is not one of"),
    (["finetuning_type=lroa"], "Did you mean 'lora'?"),
    (["quantization_bit=2"], "quantization_bit must be 4"),
    (["infer_dtype=fp8"], "infer_dtype 'fp8' is not one of"),
])
def test_impossible_values(items, message) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_from(*items)
    assert message in str(e.value)


def test_training_without_data_is_fine_when_not_training() -> None:
    cfg = load_config(None, ["model_name_or_path=m", "export_dir=out"], do_train=False)
    assert cfg.dataset is None and cfg.export_dir == "out"


def test_max_steps_alone_is_enough() -> None:
    assert cfg_from("num_train_epochs=0", "max_steps=10").max_steps == 10


def test_eval_steps_defaults_to_logging_steps() -> None:
    assert cfg_from("eval_strategy=steps", "logging_steps=7").eval_steps == 7
    assert cfg_from("eval_strategy=steps", "eval_steps=3").eval_steps == 3
    assert cfg_from().eval_steps is None


def test_load_best_with_an_eval_set() -> None:
    cfg = cfg_from("load_best_model_at_end=true", "eval_strategy=epoch", "eval_dataset=a,b")
    assert cfg.eval_dataset == ["a", "b"]


def test_val_size_fraction_or_count() -> None:
    assert cfg_from("val_size=0.1").val_size == 0.1
    count = cfg_from("val_size=100").val_size
    assert count == 100 and isinstance(count, int)


def test_resume_from_checkpoint_values() -> None:
    assert cfg_from("resume_from_checkpoint=true").resume_from_checkpoint is True
    assert cfg_from(resume_from_checkpoint="True").resume_from_checkpoint is True
    assert cfg_from("resume_from_checkpoint=saves/run/checkpoint-5").resume_from_checkpoint == "saves/run/checkpoint-5"


@pytest.mark.parametrize("key", sorted(IGNORED_KEYS))
def test_ignored_keys_are_accepted_with_a_warning(key) -> None:
    with pytest.warns(UserWarning, match=f"Ignoring {key}="):
        cfg_from(f"{key}=true")


def test_neat_packing_turns_packing_on() -> None:
    with pytest.warns(UserWarning, match="always neat"):
        assert cfg_from("neat_packing=true").packing is True


def test_unsupported_settings_warn_and_fall_back() -> None:
    with pytest.warns(UserWarning, match="adamw_torch_fused"):
        assert cfg_from("optim=adamw_8bit").optim == "adamw_torch_fused"
    assert cfg_from().optim == "adamw_torch_fused"  # transformers' default
    with pytest.warns(UserWarning, match="report_to"):
        assert cfg_from("report_to=wandb").report_to == "wandb"
    with pytest.warns(UserWarning, match="report_to"):
        cfg_from("report_to=[tensorboard, wandb]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg_from("report_to=none", "optim=adamw_torch", "quantization_bit=null")  # nothing to warn about


def test_evaluation_strategy_is_an_alias() -> None:
    with pytest.warns(UserWarning, match="old name of eval_strategy"):
        assert cfg_from("evaluation_strategy=epoch").eval_strategy == "epoch"
    with pytest.raises(ConfigError, match="keep only eval_strategy"):
        cfg_from("evaluation_strategy=epoch", "eval_strategy=steps")


@pytest.mark.parametrize("target, expected", [
    ("all", "all-linear"),
    ("all-linear", "all-linear"),
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("q_proj", ["q_proj"]),
    ("[q_proj, k_proj]", ["q_proj", "k_proj"]),
    ("default", None),
    ("null", None),
    ("''", None),
])
def test_method_config_targets(target, expected) -> None:
    assert cfg_from(f"lora_target={target}").method_config().target_modules == expected


def test_method_config_mapping() -> None:
    method = cfg_from("lora_rank=16", "lora_dropout=0.05", "use_rslora=true", "use_dora=true",
                      "additional_target=embed_tokens,lm_head").method_config()
    assert (method.r, method.lora_alpha, method.lora_dropout) == (16, 32, 0.05)
    assert method.use_rslora and method.use_dora and method.modules_to_save == ["embed_tokens", "lm_head"]
    method = cfg_from("lora_rank=4", "lora_alpha=8").method_config()
    assert (method.r, method.lora_alpha, method.modules_to_save) == (4, 8, None)


def test_to_dict_from_dict_round_trip(example) -> None:
    cfg = load_config(example, ["eval_dataset=a", "eval_strategy=steps", "lr_scheduler_kwargs={num_cycles: 2}"])
    saved = json.loads(json.dumps(cfg.to_dict()))  # as written into a checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = TrainConfig.from_dict(saved)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.eval_steps == 10 and again.lr_scheduler_kwargs == {"num_cycles": 2}


def test_missing_file_names_the_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: m\ndataset: [a, b\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line \d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model_name_or_path: m\n")
    with pytest.raises(ConfigError, match="not a list"):
        load_config(path)


def test_empty_file_needs_a_model(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        load_config(path)
