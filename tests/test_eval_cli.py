"""Perplexity (the standard strided recipe, data-parallel) and the ``attnswap eval`` command end to end."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from attnswap import AttnSwapError
from attnswap.cli import main
from attnswap.evals.corpus import default_text, load_text
from attnswap.evals.perplexity import perplexity
from attnswap.evals.specs import parse_attn, parse_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def transformers_recipe(model, input_ids, max_length, stride):
    """The strided perplexity loop as transformers documents it, written out independently."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride", [128, 64])
def test_perplexity_equals_transformers_recipe(tiny, stride):
    model, tok = tiny
    ids = tok(default_text(max_chars=5000), return_tensors="pt").input_ids[:, :700]
    ours = perplexity(model, ids, max_length=128, stride=stride)
    assert ours.tokens == (699 if stride < 128 else 700 - 6)  # disjoint windows leave each first token unscored
    assert abs(ours.ppl / transformers_recipe(model, ids, 128, stride) - 1) < 1e-3


def test_bad_input_errors(tiny, tiny_dir, tmp_path):
    model, tok = tiny
    with pytest.raises(AttnSwapError, match="shorter than one window"):
        perplexity(model, torch.ones(1, 10, dtype=torch.long), max_length=128)
    with pytest.raises(AttnSwapError, match="text file not found"):
        load_text(text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(AttnSwapError, match="could not load dataset 'no_such_dataset_xyz'"):
        load_text(dataset="no_such_dataset_xyz")
    with pytest.raises(AttnSwapError, match="malformed attention spec"):
        parse_attn("topk:k64")
    with pytest.raises(AttnSwapError, match="unknown attention kind"):
        parse_attn("softmax,topkk:k=3")
    with pytest.raises(AttnSwapError, match="option 'k'"):
        parse_attn("topk:k=0")
    with pytest.raises(AttnSwapError, match="bad layers spec"):
        parse_layers("1-x")
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert [s.label for s in parse_attn("softmax,topk:k=8,entmax:alpha=1.25")] == [
        "softmax", "topk k=8", "entmax alpha=1.25"]
    out = str(tmp_path / "o")
    assert main(["eval", "ppl", "--model", str(tmp_path / "nope"), "--out", out]) == 2
    assert main(["eval", "ppl", "--model", tiny_dir, "--attn", "topk:k=", "--out", out]) == 2
    assert main(["eval", "ppl", "--model", tiny_dir, "--text-file", str(tmp_path / "x.txt"), "--out", out]) == 2


def test_model_folder_without_a_tokenizer(tiny_dir, tmp_path, capsys):
    """Weights but no tokenizer: a one-line error naming the folder and --tokenizer (no transformers traceback);
    --tokenizer takes it from another folder."""
    import shutil
    from pathlib import Path

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    out = str(tmp_path / "o")
    common = ["--attn", "softmax", "--max-tokens", "300", "--max-length", "128", "--out", out]
    assert main(["eval", "ppl", "--model", str(bare), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer in" in err[0] and str(bare) in err[0] and "--tokenizer" in err[0]
    assert main(["eval", "ppl", "--model", str(bare), "--tokenizer", str(tmp_path / "nope"), *common]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(bare), "--tokenizer", tiny_dir, *common]) == 0


def test_eval_all_writes_results_tables_and_plots(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["eval", "all", "--model", tiny_dir, "--attn", "softmax,topk:k=4,entmax:alpha=1.5,linear",
                 "--out", str(out), "--max-tokens", "300", "--max-length", "128", "--entropy-tokens", "64",
                 "--contexts", "32,64", "--new-tokens", "2", "--repeats", "1", "--retrieval-contexts", "128",
                 "--depths", "0,100", "--trials", "1", "--focus-contexts", "64,128"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "topk k=4" in printed and "ppl" in printed and "decode tok/s" in printed
    results = json.loads((out / "results.json").read_text())
    ppl = {r["attention"]: r for r in results["perplexity"]}
    assert set(ppl) == {"model's own", "softmax", "topk k=4", "entmax alpha=1.5", "linear"}
    assert abs(ppl["softmax"]["ppl"] / ppl["model's own"]["ppl"] - 1) < 1e-3
    assert ppl["linear"]["ppl"] != ppl["softmax"]["ppl"]
    assert len(results["entropy"]) == 4 and len(results["latency"]) == 5 * 2
    assert len(results["retrieval"]) == 5 * 2 and len(results["focus"]) == 5 * 2
    assert (out / "results.jsonl").read_text().count("\n") == len(ppl) + 4 + 10 + 10 + 10
    assert "Perplexity" in (out / "results.md").read_text()
    for name in ("perplexity.png", "entropy.png", "sparsity.png", "latency.png", "retrieval.png", "focus.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_data_parallel_perplexity_equals_one_process(tiny_dir, tmp_path):
    pytest.importorskip("accelerate")
    common = ["eval", "ppl", "--model", tiny_dir, "--attn", "topk:k=8", "--max-tokens", "600",
              "--max-length", "128", "--stride", "96"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "attnswap", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # accelerate 1.x starts one process for `--cpu --num_processes 2`; two CPU processes take --multi_gpu with
    # ACCELERATE_USE_CPU=1 (gloo)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "attnswap", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env={**env, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["perplexity"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["perplexity"]
    assert [r["processes"] for r in a] == [1, 1] and [r["processes"] for r in b] == [2, 2]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["ppl"] / y["ppl"] - 1) < 1e-6, (x, y)


def test_calibrate_and_transfer_commands_then_side_by_side_rows(tiny_dir, tmp_path, capsys):
    cal, tr = str(tmp_path / "cal"), str(tmp_path / "tr")
    assert main(["calibrate", "--model", tiny_dir, "--attn", "entmax:alpha=1.5", "--out", cal,
                 "--window", "64", "--windows", "2"]) == 0
    assert main(["transfer", "--model", tiny_dir, "--attn", "linear", "--out", tr, "--window", "64",
                 "--windows", "2", "--steps", "5", "--finetune-steps", "3", "--lora-rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "score scales" in printed and "wrote" in printed and "5 steps per layer" in printed
    assert "LoRA fine-tuning (distill): 3 steps of 64 tokens" in printed
    record = json.loads((tmp_path / "tr" / "attnswap_swap.json").read_text())
    assert record["finetune"]["objective"] == "distill" and "held-back check on 256 tokens" in printed
    assert ("lora" in record) == record["finetune"]["kept"]  # no adapters when no step beat the transfer alone
    assert record.get("lora", {"rank": 2})["rank"] == 2
    out = tmp_path / "res"
    code = main(["eval", "ppl", "--model", tiny_dir, "--attn",
                 f"entmax:alpha=1.5,saved:{cal},entmax:alpha=1.5:calibrated,linear,saved:{tr}", "--out", str(out),
                 "--max-tokens", "300", "--max-length", "128", "--fit-window", "64", "--fit-windows", "2"])
    assert code == 0
    ppl = {r["attention"]: r["ppl"] for r in json.loads((out / "results.json").read_text())["perplexity"]}
    assert set(ppl) == {"model's own", "entmax alpha=1.5", f"saved {cal}", "entmax alpha=1.5 calibrated", "linear",
                        f"saved {tr}"}
    # calibrating again on the same (default) text gives the saved swap's numbers
    assert ppl[f"saved {cal}"] == pytest.approx(ppl["entmax alpha=1.5 calibrated"], rel=1e-6)
    assert ppl[f"saved {cal}"] != ppl["entmax alpha=1.5"] and ppl[f"saved {tr}"] != ppl["linear"]
    # entropy and latency of fitted rows use the fitted swap (sparsemax: an alias whose pinned alpha is not an option)
    out2 = tmp_path / "res2"
    assert main(["eval", "all", "--model", tiny_dir, "--attn", f"sparsemax,sparsemax:calibrated,saved:{cal}",
                 "--out", str(out2), "--max-tokens", "300", "--max-length", "128", "--entropy-tokens", "64",
                 "--contexts", "32", "--new-tokens", "2", "--repeats", "1", "--fit-window", "64"]) == 0
    results = json.loads((out2 / "results.json").read_text())
    entropy = {r["attention"]: r for r in results["entropy"]}
    assert entropy["sparsemax calibrated"]["metrics"] != entropy["sparsemax"]["metrics"]
    assert entropy[f"saved {cal}"]["metrics"] != entropy["sparsemax"]["metrics"]
    assert main(["calibrate", "--model", tiny_dir, "--attn", "linear", "--out", cal]) == 2
    assert main(["eval", "ppl", "--model", tiny_dir, "--attn", f"saved:{tmp_path / 'nothing'}", "--out", str(out)]) == 2


def test_fit_and_scored_texts_are_disjoint():
    from attnswap.evals.corpus import CALIBRATION_CHARS, calibration_text, fit_and_scored

    text = "".join(f"sentence {i}. " for i in range(20000))  # about 280k characters
    scored, _, fit, fit_source = fit_and_scored(text, "file t.txt", text, "file t.txt")
    assert fit == text[-CALIBRATION_CHARS:] and scored == text[:-CALIBRATION_CHARS] and "last" in fit_source
    short = text[:1000]
    scored, _, fit, _ = fit_and_scored(short, "file s.txt", short, "file s.txt")
    assert scored + fit == short and len(fit) == 500
    default = default_text()
    scored, _, fit, _ = fit_and_scored(default, "docstrings", default_eval=True)
    assert fit == calibration_text() and default == scored + fit
    scored, _, fit, _ = fit_and_scored(text, "file t.txt")  # your text, scored whole; the offline fit text
    assert scored == text and fit == calibration_text()
    with pytest.raises(AttnSwapError, match="overlap"):
        fit_and_scored(text, "file t.txt", text[5000:9000], "file part.txt")
    with pytest.raises(AttnSwapError, match="end_to_end goes with calibrated"):
        parse_attn("entmax:alpha=1.5:end_to_end")
    spec = parse_attn("sparsemax:calibrated:end_to_end")[0]
    assert spec.end_to_end and spec.label == "sparsemax calibrated end-to-end query-gain output-gain"


def test_eval_fit_text_names_what_fitted_and_what_scored(tiny_dir, tmp_path, capsys):
    text = default_text()
    path = tmp_path / "prose.txt"
    path.write_text(text[:60000])
    out = tmp_path / "res"
    assert main(["eval", "ppl", "--model", tiny_dir, "--attn", "sparsemax,sparsemax:calibrated", "--out", str(out),
                 "--eval-text", str(path), "--fit-text", str(path), "--max-tokens", "256", "--max-length", "128",
                 "--fit-window", "64", "--fit-windows", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"sparsemax calibrated: next-token loss on the held-back windows uncalibrated \d+\.\d{4}, "
                     r"layer-wise \d+\.\d{4}: kept (uncalibrated|layer-wise)", printed)  # what the check chose
    assert ("Fitted rows fit on the last 30000 characters of file prose.txt; every row is scored on file prose.txt "
            "less its last 30000 characters.") in printed
    assert "Fitted rows fit on the last 30000 characters of file prose.txt" in (out / "results.md").read_text()


def test_calibrate_command_with_length_exponents(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", tiny_dir, "--attn", "sparsemax", "--out", str(out), "--window", "64",
                 "--windows", "2", "--holdout", "0", "--end-to-end", "--end-to-end-steps", "2",
                 "--length-exponent"]) == 0
    assert "end-to-end length exponents" in capsys.readouterr().out
    record = json.loads((out / "attnswap_swap.json").read_text())
    assert all(len(o["length_exponent"]) == len(o["score_scale"]) for o in record["layer_options"].values())
    assert main(["calibrate", "--model", tiny_dir, "--attn", "sparsemax", "--out", str(out), "--window", "64",
                 "--length-exponent"]) == 2
    assert "end_to_end=True" in capsys.readouterr().err
