"""lm-eval support: the ``attnswap`` model (HFLM with swapped attention), its model_args, the offline task
``attnswap_docstrings`` and ``main`` (lm-eval's CLI). A tiny random llama with a tokenizer trained here: offline."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from attnswap.errors import AttnSwapError  # noqa: E402
from attnswap.evals import lm_eval_model as lem  # noqa: E402
from attnswap.evals.tasks import TASK_DIR, docstrings_data  # noqa: E402
from attnswap.patches.swap import current_swap  # noqa: E402

LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random llama (4 layers) and a byte-level BPE tokenizer trained on the task's own text, saved together."""
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tiny_llama")
    texts = [r["context"] + " " + c for r in docstrings_data.rows() for c in r["choices"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    T.LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def make_lm(arg_string: str):
    """The model the way lm-eval's CLI builds it (registry name + model_args)."""
    from lm_eval.api.registry import get_model

    return get_model("attnswap").create_from_arg_string(arg_string, {"device": "cpu", "batch_size": 1})


def hf_lm(path: str):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=path, device="cpu", batch_size=1)


def ll_requests(n_docs: int = 12):
    from lm_eval.api.instance import Instance

    reqs = []
    for row in docstrings_data.rows()[:n_docs]:
        for choice in row["choices"]:
            reqs.append(Instance("loglikelihood", doc=row, arguments=(row["context"], " " + choice), idx=len(reqs)))
    return reqs


def loglikelihoods(lm, reqs, batch_size: int):
    lm.batch_size_per_gpu = batch_size
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return torch.tensor([ll for ll, _ in out], dtype=torch.float64), [g for _, g in out]


# ----------------------------------------------------------------------------------------------- model_args


def test_parse_layers():
    assert lem.parse_layers(None) is None and lem.parse_layers("all") is None
    assert lem.parse_layers("0-3") == [0, 1, 2, 3]
    assert lem.parse_layers("0;5;7") == [0, 5, 7]
    assert lem.parse_layers("0-1;4-5") == [0, 1, 4, 5]
    assert lem.parse_layers(2) == [2] and lem.parse_layers([1, 3]) == [1, 3]
    assert lem.parse_layers("0,3") == [0, 3]  # the command line's --layers form is accepted too
    assert lem.parse_layers("full_attention") == "full_attention"  # a layer type, checked when swapping
    for bad in ("a-b", "3-1", "0..3"):
        with pytest.raises(AttnSwapError, match="layers"):
            lem.parse_layers(bad)


def test_model_args_parsing_survives_lm_eval_cli():
    """The layers syntax survives lm-eval's own key=value,... parser, and option values get their types."""
    from lm_eval._cli.utils import key_val_to_dict
    from lm_eval.utils import simple_parse_args_string

    for parse in (key_val_to_dict, simple_parse_args_string):
        args = parse("pretrained=x,attn=topk,k=32,layers=0-1;3,dtype=float32")
        kind, opts, layers, impl, rest = lem.split_model_args(args)
        assert (kind, opts, layers, impl) == ("topk", {"k": 32}, [0, 1, 3], "auto")
        assert rest == {"pretrained": "x", "dtype": "float32"}
    assert lem.split_model_args({"attn": "entmax", "alpha": 2})[1] == {"alpha": 2.0}
    assert lem.split_model_args({"attn": "topk", "k": "8"})[1] == {"k": 8}
    assert lem.split_model_args({"attn": "linear", "form": "quadratic"})[1] == {"eps": 1e-6, "form": "quadratic",
                                                                              "feature_map": "elu"}
    assert lem.split_model_args({})[:3] == ("softmax", {}, None)


@pytest.mark.parametrize("args, match", [
    ({"attn": "topk", "alpha": 1.5}, r"'alpha' is not an option of attention kind 'topk'; its valid options: k"),
    ({"attn": "softmax", "k": 4}, r"attention kind 'softmax'; its valid options: none"),
    ({"attn": "topk", "k": 0}, r"option 'k' of attention kind 'topk' must be"),
    ({"attn": "topk", "k": "many"}, r"option 'k' of attention kind 'topk' must be"),
    ({"attn": "entmax", "alpha": 3}, r"option 'alpha' of attention kind 'entmax' must be"),
    ({"attn": "topk", "attn_k": 3}, r"valid options: k \(default 64\)"),
    ({"attn": "nope"}, r"unknown attention kind 'nope'; available kinds: .*topk"),
    ({"attn": "topk", "layers": "0..1"}, r"bad layers spec"),
    ({"attn": "none", "k": 3}, r"attn=none keeps the model's own attention"),
])
def test_bad_model_args_give_clear_errors(args, match):
    with pytest.raises(AttnSwapError, match=match):
        lem.split_model_args(args)


# ----------------------------------------------------------------------------------------------- the model


def test_model_is_swapped(tiny_dir):
    lm = make_lm(f"pretrained={tiny_dir},attn=topk,k=3.0,layers=0-1;3")
    assert isinstance(lm, lem.AttnSwapLM)
    handle = current_swap(lm.model)
    assert handle is not None and handle.kind.name == "topk"
    assert handle.options == {"k": 3} and type(handle.options["k"]) is int
    assert handle.layers == [0, 1, 3]
    assert lm.get_model_info()["attnswap_kind"] == "topk"
    with pytest.raises(AttnSwapError, match=r"valid options: k \(default 64\)"):
        make_lm(f"pretrained={tiny_dir},attn=topk,alpha=1.5")
    with pytest.raises(AttnSwapError, match="out of range"):
        make_lm(f"pretrained={tiny_dir},attn=topk,layers=2-9")
    with pytest.raises(AttnSwapError, match=r"'kk'.*options of attention kind 'topk': k \(default 64\)"):
        make_lm(f"pretrained={tiny_dir},attn=topk,kk=3")  # a typo reaches from_pretrained, which rejects it
    assert current_swap(make_lm(f"pretrained={tiny_dir},attn=none").model) is None


def test_saved_swap_is_loaded_by_model_args(tiny_dir, tmp_path):
    """swap=DIR loads a calibrated swap (per-layer score scales) saved beside the model, and gives its numbers."""
    import attnswap
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    data = torch.randint(3, model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0))
    fitted = attnswap.calibrate(model, "entmax", data, window=64, max_windows=2, holdout=0, alpha=1.5)
    attnswap.save_swap(model, tmp_path / "cal")
    lm = make_lm(f"pretrained={tiny_dir},swap={tmp_path / 'cal'}")
    handle = current_swap(lm.model)
    assert handle.kind.name == "entmax" and lm.get_model_info()["attnswap_kind"] == "entmax"
    assert handle.options_of(1)["score_scale"] == fitted.options_of(1)["score_scale"]
    reqs = ll_requests(4)
    calibrated, _ = loglikelihoods(lm, reqs, 1)
    raw, _ = loglikelihoods(make_lm(f"pretrained={tiny_dir},attn=entmax,alpha=1.5"), reqs, 1)
    assert (calibrated - raw).abs().max() > 1e-3
    with pytest.raises(AttnSwapError, match="do not also give 'attn'"):
        make_lm(f"pretrained={tiny_dir},swap={tmp_path / 'cal'},attn=topk")
    with pytest.raises(AttnSwapError, match="no saved swap"):
        make_lm(f"pretrained={tiny_dir},swap={tmp_path / 'missing'}")


def test_loglikelihood_batching_and_swap(tiny_dir):
    """HFLM right-pads loglikelihood batches and passes no attention mask: with causal attention the padding can
    not reach the scored tokens, so batch_size 1 and 4 agree, for the model's own attention and swapped kinds;
    a swapped softmax equals the model's own; topk k=1 really changes the numbers."""
    reqs = ll_requests()
    results = {}
    for name, lm in (("hf", hf_lm(tiny_dir)), ("none", make_lm(f"pretrained={tiny_dir},attn=none")),
                     ("softmax", make_lm(f"pretrained={tiny_dir},attn=softmax")),
                     ("topk1", make_lm(f"pretrained={tiny_dir},attn=topk,k=1")),
                     ("entmax", make_lm(f"pretrained={tiny_dir},attn=entmax,alpha=1.5,layers=1;2")),
                     ("linear", make_lm(f"pretrained={tiny_dir},attn=linear"))):
        ll1, greedy1 = loglikelihoods(lm, reqs, 1)
        ll4, greedy4 = loglikelihoods(lm, reqs, 4)
        torch.testing.assert_close(ll4, ll1, atol=1e-4, rtol=1e-5, msg=f"{name}: batch 4 != batch 1")
        assert greedy1 == greedy4
        results[name] = ll1
    assert torch.equal(results["none"], results["hf"])
    torch.testing.assert_close(results["softmax"], results["hf"], atol=1e-4, rtol=1e-5)
    assert (results["topk1"] - results["softmax"]).abs().max() > 1e-2
    assert (results["entmax"] - results["softmax"]).abs().max() > 1e-2
    assert (results["linear"] - results["softmax"]).abs().max() > 1e-2


def test_generate_until_batching_and_swap(tiny_dir):
    """generate_until left-pads and passes the attention mask to generate (which builds its own KV cache)."""
    from lm_eval.api.instance import Instance

    gen = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance("generate_until", doc={}, arguments=(row["context"], dict(gen)), idx=i)
            for i, row in enumerate(docstrings_data.rows()[:6])]
    outs = {}
    for name, lm in (("hf", hf_lm(tiny_dir)), ("softmax", make_lm(f"pretrained={tiny_dir},attn=softmax")),
                     ("topk2", make_lm(f"pretrained={tiny_dir},attn=topk,k=2")),
                     ("linear", make_lm(f"pretrained={tiny_dir},attn=linear"))):
        for bs in (1, 4):
            lm.batch_size_per_gpu = bs
            outs[name, bs] = lm.generate_until(reqs, disable_tqdm=True)
        assert outs[name, 1] == outs[name, 4], name
    assert outs["softmax", 1] == outs["hf", 1]
    assert outs["topk2", 1] != outs["softmax", 1] and outs["linear", 1] != outs["softmax", 1]


# ----------------------------------------------------------------------------------------------- main / CLI


def _samples(out_dir) -> dict[int, list[float]]:
    (path,) = glob.glob(os.path.join(out_dir, "*", "samples_attnswap_docstrings_*.jsonl"))
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["doc_id"]: [float(x[0]) for x in r["filtered_resps"]] for r in rows}


@pytest.fixture(scope="module")
def cli_runs(tiny_dir, tmp_path_factory):
    """main(...) in-process for softmax and topk k=1 on 20 items: (stdout, per-doc loglikelihoods)."""
    runs = {}
    for name, extra in (("softmax", "attn=softmax"), ("topk1", "attn=topk,k=1")):
        out = tmp_path_factory.mktemp(f"lm_eval_{name}")
        argv = ["--model", "attnswap", "--model_args", f"pretrained={tiny_dir},{extra}", "--tasks",
                "attnswap_docstrings", "--limit", "20", "--device", "cpu", "--batch_size", "4",
                "--output_path", str(out), "--log_samples"]
        runs[name] = (argv, out)
    return runs


def test_main_prints_results_table_and_swaps(cli_runs, capsys):
    printed, lls = {}, {}
    for name, (argv, out) in cli_runs.items():
        assert lem.main(argv) == 0
        printed[name] = capsys.readouterr().out
        lls[name] = _samples(out)
    for text in printed.values():
        assert "attnswap_docstrings" in text and "|acc     |" in text and "|acc_norm|" in text
    assert "'attn': 'topk', 'k': 1" in printed["topk1"]
    assert sorted(lls["softmax"]) == list(range(20))
    diff = max(abs(a - b) for d in lls["softmax"] for a, b in zip(lls["softmax"][d], lls["topk1"][d]))
    assert diff > 1e-2, "topk k=1 gave the same loglikelihoods as softmax: the attention was not swapped"


def test_main_bad_option_and_include_path(tiny_dir):
    with pytest.raises(AttnSwapError, match=r"'alpha' is not an option of attention kind 'topk'; its valid options: k"):
        lem.main(["--model", "attnswap", "--model_args", f"pretrained={tiny_dir},attn=topk,alpha=1.5",
                  "--tasks", "attnswap_docstrings", "--limit", "2"])
    assert lem.build_argv(["--model", "attnswap"])[:2] == ["--include_path", str(TASK_DIR)]
    assert lem.build_argv(["run", "--tasks", "x"])[:3] == ["run", "--include_path", str(TASK_DIR)]
    assert lem.build_argv(["--include_path", "/mine", "--tasks", "x"]) == ["--include_path", "/mine", "--tasks", "x"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="needs accelerate")
def test_accelerate_two_cpu_processes_match_one(cli_runs, tmp_path):
    """Data-parallel over 2 CPU processes (accelerate's torchrun launcher; ACCELERATE_USE_CPU=1 makes it gloo/CPU)
    gives the same per-item loglikelihoods as one process: each rank scores half, rank 0 gathers."""
    argv, out1 = cli_runs["topk1"]
    if not glob.glob(os.path.join(out1, "*", "samples_*.jsonl")):
        assert lem.main(argv) == 0
    out2 = tmp_path / "two"
    argv2 = [a if a != str(out1) else str(out2) for a in argv]
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                           "-m", "attnswap.evals.lm_eval_model", *argv2],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1" in proc.stderr, "the second process did not take part"
    assert "|acc     |" in proc.stdout
    one, two = _samples(out1), _samples(out2)
    assert sorted(one) == sorted(two) == list(range(20))
    for d in one:
        assert one[d] == pytest.approx(two[d], abs=1e-4)
