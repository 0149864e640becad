"""The GPU tier's module header (tests/gpu): `torch`, whose absence skips the importing test
module, and the marks every GPU test module carries (`gpu`, skipped without CUDA, optionally a
timeout). In a test module:

    from tests.gpu_marks import gpu_marks, torch

    pytestmark = gpu_marks(timeout_s=300)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def gpu_marks(timeout_s: int | None = None) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.gpu,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    if timeout_s is not None:
        marks.append(pytest.mark.timeout(timeout_s))
    return marks
