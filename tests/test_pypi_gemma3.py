"""The real-model checks (``real_model_checks.py``) on gemma3-270m."""

import pytest

from real_model_checks import load, test_calibration_fitted_on_other_text_lowers_entmax_perplexity, \
    test_softmax_swap_is_exact  # noqa: F401  (collected here)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load("gemma3-270m")
