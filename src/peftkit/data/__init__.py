"""SFT data: dataset_info.json and files -> canonical conversations -> chat template + loss mask -> (packed) batches.

    train, eval = build_sft_dataset(tokenizer, "alpaca_en_demo", "data", cutoff_len=1024, val_size=0.1)
    batch = SFTCollator(tokenizer.pad_token_id)(train[:8])
"""

from .dataset import DataReport, DatasetStats, build_dataset, build_sft_dataset, default_cache_dir, load_conversations
from .formats import Conversation
from .from_predictions import predictions_to_alpaca
from .packing import KtoCollator, PairCollator, SFTCollator, check_packing_support, collator_for, pack
from .templates import IGNORE_INDEX, TEMPLATES, ChatTemplate, StringTemplate, Template, encode, get_template

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "Conversation",
    "DataReport",
    "DatasetStats",
    "KtoCollator",
    "PairCollator",
    "SFTCollator",
    "StringTemplate",
    "Template",
    "build_dataset",
    "build_sft_dataset",
    "check_packing_support",
    "collator_for",
    "default_cache_dir",
    "encode",
    "get_template",
    "load_conversations",
    "pack",
    "predictions_to_alpaca",
]
