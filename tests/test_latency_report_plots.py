"""Latency measurement, results files and tables, and plots (attnswap.evals.latency / report / plots)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers as T

import attnswap
from attnswap.errors import AttnSwapError
from attnswap.evals.latency import measure_latency
from attnswap.evals.report import ResultsWriter, format_table, markdown_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYS = {"context", "batch", "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread", "peak_mem_mb",
        "device", "dtype", "repeats"}
TINY = dict(context_lengths=(8, 24), batch_sizes=(1, 2), new_tokens=3, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def llama():
    # one thread: a tiny model gains nothing from more, and on a busy machine OpenMP threads waiting for each
    # other can make each forward ~100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    yield T.LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


def _check_records(records, seen):
    assert [(r["batch"], r["context"]) for r in records] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    assert seen == records  # on_record got each record, in order, as it was done
    for r in records:
        assert KEYS <= r.keys() and "error" not in r
        assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0
        assert r["prefill_ms_spread"] >= 0 and r["decode_tok_s_spread"] >= 0
        assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["repeats"] == 2
        assert "ru_maxrss" in r["peak_mem_method"]
        json.dumps(r, allow_nan=False)


def test_measure_latency_records(llama):
    seen, ticks = [], []
    records = measure_latency(llama, **TINY, on_record=seen.append, progress=ticks.append)
    _check_records(records, seen)
    assert sum(ticks) == 4
    assert llama.training is False


def test_measure_latency_swapped_linear(llama):
    seen = []
    with attnswap.swapped(llama, "linear"):
        records = measure_latency(llama, **TINY, on_record=seen.append)
    _check_records(records, seen)


def test_measure_latency_error_becomes_record(llama):
    # ids beyond the embedding table: every configuration fails, the run goes on
    seen = []
    records = measure_latency(llama, context_lengths=(4, 8), new_tokens=2, repeats=1, vocab_size=10**6,
                              on_record=seen.append)
    assert len(records) == 2 and seen == records
    for r in records:
        assert r["error"] and r["prefill_ms"] is None and r["decode_tok_s"] is None
        assert KEYS <= r.keys()
    # and the model still works afterwards
    assert measure_latency(llama, context_lengths=(4,), new_tokens=1, warmup=0, repeats=1)[0]["prefill_ms"] > 0


def test_measure_latency_bad_arguments(llama):
    with pytest.raises(AttnSwapError):
        measure_latency(llama, context_lengths=(0,))
    with pytest.raises(AttnSwapError):
        measure_latency(llama, repeats=0)


def test_results_writer_survives_interruption(tmp_path):
    writer = ResultsWriter(tmp_path / "run")
    writer.add("latency", {"context": 8, "prefill_ms": 1.5, "tensor": torch.tensor(2.0)})
    # "interrupted" here: what is on disk is complete, valid JSON
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == {"latency": [{"context": 8, "prefill_ms": 1.5, "tensor": 2.0}]}
    writer.add("perplexity", {"kind": "linear", "ppl": float("nan"), "arr": np.arange(2)})
    writer.add("latency", {"context": 16, "prefill_ms": 2.5, "error": None})
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["context"] for r in on_disk["latency"]] == [8, 16]
    assert on_disk["perplexity"] == [{"kind": "linear", "ppl": None, "arr": [0, 1]}]
    lines = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [line["section"] for line in lines] == ["latency", "perplexity", "latency"]
    assert lines[2]["record"]["prefill_ms"] == 2.5

    resumed = ResultsWriter(tmp_path / "run", resume=True)
    resumed.add("latency", {"context": 32})
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["latency"]) == 3
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 4
    fresh = ResultsWriter(tmp_path / "run")
    assert json.loads(fresh.json_path.read_text()) == {} and fresh.jsonl_path.read_text() == ""

    columns = [("kind", "attention", None), ("ppl", "perplexity", ".3f")]
    path = writer.write_markdown("Run", {"Perplexity": ([{"kind": "softmax", "ppl": 12.9661}], columns),
                                         "Raw": "| a |\n|---|\n| 1 |"}, notes="CPU, 2 cores.")
    text = path.read_text()
    assert text.startswith("# Run\n") and "## Perplexity" in text and "| softmax | 12.966 |" in text
    assert "## Raw" in text and "CPU, 2 cores." in text


def test_tables():
    rows = [{"kind": "softmax", "ppl": 12.96612, "n": 4096}, {"kind": "topk|k=64", "ppl": float("nan")},
            {"kind": "linear", "ppl": 3436.2, "n": 512}]
    columns = [("kind", "attention", None), ("ppl", "perplexity", ".2f"), ("n", "tokens"),
               (lambda r: len(r["kind"]), "len", "d")]
    text = format_table(rows, columns)
    lines = text.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines[:2]}) == 1
    assert lines[0].split() == ["attention", "perplexity", "tokens", "len"]
    assert set(lines[1]) <= {"-", " "}
    assert "12.97" in lines[2] and "nan" in lines[3] and "3436.20" in lines[4]
    assert lines[3].split()[2] == "-"  # missing value
    # numbers right-aligned: the numeric column's cells end at the same position
    assert lines[2].index("12.97") + 5 == lines[4].index("3436.20") + 7

    md = markdown_table(rows, columns).splitlines()
    assert md[0] == "| attention | perplexity | tokens | len |"
    assert md[1] == "|---|---:|---:|---:|"
    assert md[3] == "| topk\\|k=64 | nan | — | 9 |"
    assert format_table([], columns).splitlines()[0].split() == ["attention", "perplexity", "tokens", "len"]


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 2000


def test_plots(tmp_path, llama):
    pytest.importorskip("matplotlib")  # the `eval` extra
    from attnswap.evals import plots

    m = np.random.default_rng(0).random((2, 4)) * 3
    with_nan = m.copy()
    with_nan[0, 1] = np.nan
    out = plots.entropy_heatmap(torch.tensor(with_nan), "softmax", tmp_path / "one.png")
    assert _is_png(out)
    out = plots.entropy_heatmaps({"softmax": m, "topk": with_nan, "linear": [[1.0, None], [np.nan]],
                                  "all-nan": np.full((2, 4), np.nan)}, tmp_path / "sub" / "many.png",
                                 "entropy (nats)")
    assert out == tmp_path / "sub" / "many.png" and _is_png(out)
    assert _is_png(plots.entropy_heatmaps({}, tmp_path / "none.png", "entropy"))

    recs = measure_latency(llama, context_lengths=(8, 16), new_tokens=1, warmup=0, repeats=1)
    broken = [dict(recs[0]), {**recs[1], "prefill_ms": None, "decode_tok_s": float("nan"), "error": "OOM"}]
    assert _is_png(plots.latency_plot({"softmax": recs, "linear": broken, "empty": []}, tmp_path / "lat.png"))
    assert _is_png(plots.latency_plot({}, tmp_path / "lat_none.png"))

    rows = [{"kind": "softmax", "ppl": 12.97}, {"kind": "topk", "ppl": 13.26}, {"kind": "linear", "ppl": math.nan},
            {"kind": "taylor", "ppl": None}, {"kind": "entmax", "ppl": float("inf")}]
    assert _is_png(plots.perplexity_plot(rows, tmp_path / "ppl.png", baseline=12.966))
    assert _is_png(plots.perplexity_plot(rows[2:], tmp_path / "ppl_none.png", baseline=math.nan))
    assert _is_png(plots.perplexity_plot([], tmp_path / "ppl_empty.png"))
