"""lm-evaluation-harness support: the model ``attnswap`` (an ``HFLM`` whose attention is swapped) and ``main``.

Importing this module registers the model with lm-eval. From the command line::

    attnswap lm-eval --model attnswap --model_args pretrained=DIR,attn=topk,k=32,layers=0-3 \\
        --tasks attnswap_docstrings
    python -m attnswap.evals.lm_eval_model ...      # the same; also under `accelerate launch`

``model_args`` (comma-separated ``key=value``, as lm-eval parses them):

- ``pretrained=DIR`` a Hugging Face folder, or ``default`` for attnswap's SmolLM2-135M (converted and cached once);
- ``attn=KIND`` (default ``softmax``) and that kind's options by name, e.g. ``k=32`` (topk), ``alpha=1.5``
  (entmax), ``eps=1e-6,form=quadratic`` (linear); values are converted to the option's type. ``attn=none``
  keeps the model's own attention (for side-by-side runs);
- ``layers=SPEC`` which attention layers to swap (default all): indices and inclusive ranges joined by ``;``
  (``,`` separates model_args), e.g. ``layers=0-3`` (0,1,2,3), ``layers=0;5;7``, ``layers=0-3;8-11``;
- ``impl=auto|torch|triton`` (default auto);
- ``swap=DIR`` instead of ``attn``/options/``layers``: a swap saved with ``attnswap.save_swap`` (or by
  ``attnswap calibrate``/``attnswap transfer``), with its per-layer options and learned maps; it is checked to
  belong to this model;
- everything else goes to lm-eval's ``HFLM`` (``dtype``, ``max_length``, ``batch_size``, ...).

``main(argv)`` runs lm-eval's own CLI with ``argv`` and adds ``--include_path`` to attnswap's task folder
(``attnswap/evals/tasks``, with the offline task ``attnswap_docstrings``) unless ``argv`` names one.

Data-parallel on CPU: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m
attnswap.evals.lm_eval_model ...`` (or ``torchrun``); ``accelerate launch --cpu --num_processes 2`` starts only
one process. HFLM shards requests only when it sees several GPUs; this model shards on CPU too.

Correctness (checked by ``tests/test_lm_eval.py``): HFLM's loglikelihood calls the model on right-padded batches
with no attention mask; attnswap applies the causal mask for every kind, so the padding after a sequence cannot
change its scores and batch_size=1 and batch_size=N agree. ``generate_until`` left-pads and passes the attention
mask to ``generate`` (which builds its own KV cache); attnswap honors both.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

from .. import registry
from ..errors import AttnSwapError
from .specs import parse_layers
from .tasks import TASK_DIR, TASKS

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("attnswap's lm-eval support needs lm-eval: pip install 'attnswap[eval]' "
                      "(or pip install lm-eval)") from e

MODEL_NAME = "attnswap"
OWN = ("none", "own", "model")  # attn=none: the model's own attention (no swap), for side-by-side runs


def _convert(opt: registry.Option, value: Any) -> Any:
    """A model_args value (str, int, float or bool, as lm-eval parsed it) -> the option's type when it is one
    (``k=32.0`` -> 32, ``alpha=2`` -> 2.0); otherwise left as is for the registry's validation to reject."""
    if isinstance(value, bool):
        return value
    try:
        if opt.type is int:
            if isinstance(value, str):
                value = float(value.strip())
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif opt.type is float and isinstance(value, str):
            return float(value)
        elif opt.type is str and isinstance(value, (int, float)):
            return str(value)
    except ValueError:
        pass
    return value


def _valid_options(kind_name: str) -> str:
    if kind_name == "none":
        return "none"
    kind = registry.get(kind_name)
    return ", ".join(f"{o.name} (default {o.default!r})" for o in kind.options if o.name not in kind.fixed) or "none"


def _all_option_names() -> set[str]:
    return {o.name for n in registry.names() for o in registry.get(n).options}


def split_model_args(kwargs: dict) -> tuple[str, dict, list[int] | None, str, dict]:
    """Split model_args into (kind, its validated options, layers, impl, the rest for HFLM).

    Raises a clear AttnSwapError on an unknown kind, a bad option value, an option of another kind, or a bad
    layers spec, before any model is loaded.
    """
    kwargs = dict(kwargs)
    kind_name = kwargs.pop("attn", "softmax")
    kind_name = "none" if kind_name is None else str(kind_name).strip()  # lm-eval may turn attn=none into None
    if kind_name.lower() in OWN:
        stray = sorted(n for n in kwargs if n in _all_option_names() or n.startswith("attn_"))
        if stray or kwargs.get("layers") not in (None, "", "all"):
            raise AttnSwapError(f"attn={kind_name} keeps the model's own attention: it takes no options or layers, "
                                f"got {', '.join(map(repr, stray or ['layers']))}")
        kwargs.pop("layers", None)
        kwargs.pop("impl", None)
        return "none", {}, None, "auto", kwargs
    kind = registry.get(kind_name)  # unknown kind: error listing the available kinds
    schema = {o.name: o for o in kind.options if o.name not in kind.fixed}
    valid = _valid_options(kind_name)
    options = {}
    for name in list(kwargs):
        if name in schema:
            options[name] = _convert(schema[name], kwargs.pop(name))
        elif name.startswith("attn_") and name != "attn_implementation":
            raise AttnSwapError(f"unknown model_args option {name!r} for attention kind {kind_name!r}; its valid "
                                f"options: {valid} (given without a prefix, e.g. k=32)")
    # an option of some other kind (k=32 with attn=entmax) is a mistake, not a from_pretrained argument
    others = _all_option_names() - set(schema)
    stray = sorted(n for n in kwargs if n in others)
    if stray:
        what = "is not an option" if len(stray) == 1 else "are not options"
        raise AttnSwapError(f"model_args {', '.join(map(repr, stray))} {what} of attention kind {kind_name!r}; "
                            f"its valid options: {valid}")
    options = kind.resolve(options)  # type/range errors name the option and its rule
    options = {k: v for k, v in options.items() if k not in kind.fixed}
    layers = parse_layers(kwargs.pop("layers", None))
    impl = str(kwargs.pop("impl", "auto"))
    return kind_name, options, layers, impl, kwargs


def split_swap_arg(kwargs: dict) -> tuple[str | None, dict]:
    """Take ``swap=DIR`` (a saved swap) out of model_args; it replaces attn, the kind's options and layers."""
    kwargs = dict(kwargs)
    swap_dir = kwargs.pop("swap", None)
    if swap_dir is None:
        return None, kwargs
    clash = sorted(n for n in kwargs if n in ("attn", "layers") or n in _all_option_names())
    if clash:
        raise AttnSwapError(f"model_args swap={swap_dir} loads a saved swap with its own kind, options and layers; "
                            f"do not also give {', '.join(map(repr, clash))}")
    return str(swap_dir), kwargs


@register_model(MODEL_NAME)
class AttnSwapLM(HFLM):
    """lm-eval's HFLM with attnswap's attention: ``--model attnswap --model_args pretrained=DIR,attn=topk,k=32``."""

    def __init__(self, pretrained: Any = "default", **kwargs):
        swap_dir, kwargs = split_swap_arg(kwargs)
        kind, options, layers, impl, rest = split_model_args(kwargs)
        from ..default_model import named_model_path

        named = named_model_path(pretrained) if isinstance(pretrained, str) else None  # default, or pypi:NAME
        if named is not None:
            pretrained = str(named)
        try:
            super().__init__(pretrained=pretrained, **rest)
        except TypeError as e:
            raise AttnSwapError(f"{e} (attnswap's model_args are attn, layers, impl and the options of attention "
                                f"kind {kind!r}: {_valid_options(kind)}; the rest go to lm-eval's HFLM and on to "
                                "from_pretrained)") from e
        from .. import load_swap, swap_attention

        if swap_dir is not None:
            self.swap_handle = load_swap(self.model, swap_dir)
            kind, layers = self.swap_handle.kind.name, self.swap_handle.layers
            options = {k: v for k, v in self.swap_handle.options.items() if k not in self.swap_handle.kind.fixed}
        else:
            self.swap_handle = (None if kind == "none" else
                                swap_attention(self.model, kind, layers=layers, impl=impl, **options))
        self.attn_kind, self.attn_options, self.attn_layers, self.attn_impl = kind, options, layers, impl
        self.attn_swap_dir = swap_dir
        self._fix_cpu_data_parallel()

    def _fix_cpu_data_parallel(self) -> None:
        """HFLM shards requests across ``accelerate launch`` processes only when it sees >1 GPU; on CPU (or one
        GPU) every process would evaluate everything. Shard there too."""
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and self._world_size == 1:
            self._rank = acc.process_index
            self._world_size = acc.num_processes

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(attnswap_kind=self.attn_kind, attnswap_options=self.attn_options,
                    attnswap_layers=self.attn_layers, attnswap_swap_dir=self.attn_swap_dir)
        return info


def _has_include_path(argv: list[str]) -> bool:
    return any(a == "--include_path" or a.startswith("--include_path=") for a in argv)


def build_argv(argv: list[str]) -> list[str]:
    """``argv`` for lm-eval's CLI, with ``--include_path`` to attnswap's tasks unless one is given (lm-eval
    takes a single include path: yours then replaces ours)."""
    argv = list(argv)
    if not argv or _has_include_path(argv) or argv[0] in ("-h", "--help"):
        return argv
    if argv[0] in ("run", "ls", "validate"):
        return argv[:1] + ["--include_path", str(TASK_DIR)] + argv[1:]
    if argv[0].startswith("-"):  # lm-eval's legacy form without 'run'
        return ["--include_path", str(TASK_DIR)] + argv
    return argv


def _requested_tasks(argv: list[str]) -> list[str]:
    tasks, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--tasks=") or a.startswith("-t="):
            tasks += a.split("=", 1)[1].split(",")
        elif a in ("--tasks", "-t"):
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                tasks += argv[i].split(",")
        i += 1
    return [t.strip() for t in tasks if t.strip()]


@contextlib.contextmanager
def _skip_lm_eval_index(argv: list[str]):
    """When the run asks only for attnswap's own tasks (and our --include_path is used), build lm-eval's task index
    from our folder alone: indexing lm-eval's thousands of task YAMLs takes 10+ s and is not needed."""
    try:
        import lm_eval.tasks as lm_tasks

        original = lm_tasks.TaskManager
        usable = "include_defaults" in inspect.signature(original.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        usable = False
    tasks = _requested_tasks(argv)
    ours = (argv[:1] == ["run"] or argv[:1] == ["--include_path"]) and str(TASK_DIR) in argv
    if not (usable and ours and tasks and all(t in TASKS for t in tasks)):
        yield
        return

    class OurTasksOnly(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_tasks.TaskManager = OurTasksOnly
    try:
        yield
    finally:
        lm_tasks.TaskManager = original


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line (``lm-eval run ...``; ``run`` may be left out) with the ``attnswap`` model
    registered and attnswap's task folder included. Returns the exit status."""
    argv = build_argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval"] + argv  # lm-eval's CLI reads sys.argv (and inserts 'run' when it is left out)
    try:
        try:
            from lm_eval._cli import HarnessCLI  # lm-eval >= 0.4.9-ish: subcommands run / ls / validate
        except ImportError:  # older lm-eval: a single flat command
            from lm_eval.__main__ import cli_evaluate

            if argv[:1] == ["run"]:
                sys.argv = ["lm-eval"] + argv[1:]
            cli_evaluate()
            return 0
        from lm_eval.utils import setup_logging

        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        with _skip_lm_eval_index(argv):
            parser.execute(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
