"""The offline text: the evaluation corpus is fixed, and the fine-tuning text never repeats its start."""

from attnswap.evals.corpus import FINETUNE_CHARS, calibration_text, default_text, finetune_text, stdlib_docstrings

EVALUATED_CHARS = 40_000  # more than the first 8192 tokens `attnswap eval` scores by default


def test_finetune_text_is_disjoint_from_the_evaluated_text():
    text, evaluated = finetune_text(), default_text()[:EVALUATED_CHARS]
    assert len(default_text()) - FINETUNE_CHARS > EVALUATED_CHARS  # its first part starts after the scored text
    assert text.startswith(calibration_text(FINETUNE_CHARS))
    assert len(text) > 3 * FINETUNE_CHARS  # more of the standard library than the evaluation corpus holds
    scored = [doc for doc in stdlib_docstrings() if doc[:200] in evaluated]
    assert len(scored) > 20
    assert not any(doc in text for doc in scored)
    assert finetune_text(1000) == text[:1000]


def test_docstrings_with_methods_extend_without_repeating():
    plain = stdlib_docstrings(("logging",))
    both = stdlib_docstrings(("logging",), methods=True)
    assert plain and set(plain) < set(both) and len(both) == len(set(both))
    assert stdlib_docstrings(("logging",), methods=True, exclude=plain) == [d for d in both if d not in plain]
    assert stdlib_docstrings(("no_such_module_here",)) == []
