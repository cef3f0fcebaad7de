"""Multi-phase recipes (`phases:` in the YAML), such as DMT (Dong et al., 2024, "How Abilities in Large Language
Models are Affected by Supervised Fine-tuning Data Composition"): specialised data first, then general data mixed
with a share of it.

Each phase is a whole run of its own into output_dir/phase-N, starting from the previous phase's weights (its adapter,
or its model for methods that train the model itself) with a fresh optimizer and schedule, as the paper trains. A
phase that finished (its train_results.json) is never trained again, so a stopped recipe continues, with
resume_from_checkpoint: true, at the phase and step where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ..config import Recipe, TrainConfig
from ..errors import ConfigError, TrainingInterrupted
from ..io.atomic import write_text
from ..io.outputs import LOCK_NAME, MARKER, clear_output, lock_output, record_outputs
from ..methods import get_method
from .checkpoint import PREFIX, check_output_dir, list_checkpoints
from .run import run_sft

RESULTS_NAME = "train_results.json"


def phase_dir(recipe: Recipe, phase: int) -> Path:
    return Path(recipe.output_dir) / f"phase-{phase}"


def from_result(cfg: TrainConfig, folder: str | Path) -> TrainConfig:
    """`cfg` starting from the training result in `folder`: its model for methods that save a model (full), else its
    adapter (freeze's layers and prompt methods' tokens are saved as an adapter too). A recipe's next phase trains it
    further; `do_predict` after training predicts with it."""
    if get_method(cfg.finetuning_type).output_kind == "model":
        return dataclasses.replace(cfg, model_name_or_path=str(folder), adapter_name_or_path=None)
    return dataclasses.replace(cfg, adapter_name_or_path=str(folder))


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Train every phase not yet finished, then copy the last one's result to output_dir; returns the results
    written to output_dir/train_results.json (the last phase's, with every phase's under `phases`)."""
    out = Path(recipe.output_dir)
    _check_start(recipe, out)
    with lock_output(out):
        if recipe.overwrite and not recipe.resume:
            clear_output(out, "output_dir")
        for i, cfg in enumerate(recipe.phases, 1):
            folder = phase_dir(recipe, i)
            if (folder / RESULTS_NAME).is_file():
                print(f"Phase {i} of {len(recipe.phases)}: done earlier ({folder}).")
                continue
            if i > 1:
                cfg = from_result(cfg, phase_dir(recipe, i - 1))
            resume = bool(list_checkpoints(folder))  # only a resumed recipe reaches a phase that has checkpoints
            cfg = dataclasses.replace(cfg, resume_from_checkpoint=True if resume else None,
                                      overwrite_output_dir=not resume)  # the phase folder is the recipe's own
            record_outputs(out, [folder.name])  # before training: an overwrite of the recipe clears it
            print(f"Phase {i} of {len(recipe.phases)}: {'resuming' if resume else 'training'} into {folder}.")
            try:
                run_sft(cfg)
            except TrainingInterrupted as e:  # the recipe resumes itself: at this phase, from this checkpoint
                raise TrainingInterrupted(f"{e} (phase {i} of {len(recipe.phases)})", "true") from None
        return _publish(recipe, out)


def _check_start(recipe: Recipe, out: Path) -> None:
    """A fresh recipe into a folder with an earlier one's phases is refused (unless overwrite); a resume needs one."""
    earlier = sorted(p.name for p in out.glob("phase-*") if p.is_dir()) if out.is_dir() else []
    if recipe.resume:
        if not earlier:
            raise ConfigError(f"resume_from_checkpoint is true, but '{out}' holds no phase-N folder of a recipe to "
                              "continue; remove it to start the recipe.")
        return
    if earlier and not recipe.overwrite:
        raise ConfigError(f"output_dir '{out}' holds an earlier recipe ({earlier[0]}); set overwrite_output_dir: true "
                          "to replace it, resume_from_checkpoint: true to continue it, or choose another output_dir.")
    check_output_dir(out, recipe.overwrite, None)  # an earlier single run's adapter or model there


def _publish(recipe: Recipe, out: Path) -> dict[str, Any]:
    """The last phase's result (adapter or model, tokenizer, config, logs) copied to output_dir, where exporting,
    chatting and predicting look for it; its checkpoints stay in the phase folder."""
    last = phase_dir(recipe, len(recipe.phases))
    copied = []
    for entry in sorted(last.iterdir()):
        if entry.name in (LOCK_NAME, MARKER, RESULTS_NAME) or entry.name.startswith(PREFIX) or entry.is_dir():
            continue
        shutil.copy2(entry, out / entry.name)
        copied.append(entry.name)
    phases = []
    for i in range(1, len(recipe.phases) + 1):
        results = json.loads((phase_dir(recipe, i) / RESULTS_NAME).read_text(encoding="utf-8"))
        phases.append({"phase": i, "output_dir": str(phase_dir(recipe, i)), **results})
    results = {**phases[-1], "phases": phases}
    del results["phase"], results["output_dir"]
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    record_outputs(out, [*copied, RESULTS_NAME])
    return results
