"""Error-feedback GGUF encoder: stock headers, codes on the stock grid, lower output error.

References: ggml's own encoder outputs (tests/data/ggml_quants.npz) and the `gguf`
package's dequantizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml import error_feedback as ef
from ideoquant.codecs.ggml.registry import ggml_type

DATA = Path(__file__).parent / "data" / "ggml_quants.npz"
FEEDBACK_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0"]
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


def _cases(ref, n: int) -> list[str]:
    return sorted({k.split("/")[1] for k in ref if k.startswith(f"n{n}/") and k.count("/") == 2})


def _codes_from_gguf(cls, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gguf package's decode, the grid and the codes it implies."""
    theirs = torch.from_numpy(gguf_quants.dequantize(blocks, cls.qtype).reshape(blocks.shape[0], -1).copy())
    step, offset = ef.grid_step_offset(cls, torch.from_numpy(blocks))
    safe = torch.where(step == 0, torch.ones_like(step), step)
    return theirs, step, offset, torch.round((theirs - offset) / safe).to(torch.int32)


@pytest.mark.parametrize("qtype", FEEDBACK_TYPES)
def test_grid_and_code_packing_match_ggml_blocks(ref, qtype):
    """The grid reproduces the gguf decode, and repacking ggml's codes gives ggml's bytes."""
    cls = ggml_type(qtype)
    for case in _cases(ref, 256):
        blocks = ref[f"n256/{case}/{qtype}"]
        theirs, step, offset, codes = _codes_from_gguf(cls, blocks)
        live = step != 0
        assert torch.equal((step * codes + offset)[live], theirs[live]), case
        grid = ef.GRIDS[cls.qtype]
        assert bool(((codes[live] >= grid.lo) & (codes[live] <= grid.hi)).all()), case
        if bool(live.all()):
            assert np.array_equal(ef.rows_with_codes(cls, torch.from_numpy(blocks), codes).numpy(), blocks), case


@pytest.mark.parametrize("qtype", KQUANTS)
@pytest.mark.parametrize("imatrix", ["", "+imatrix_random"])
def test_identity_second_moments_reproduce_ggml(ref, qtype, imatrix):
    """With H = I no error moves between columns: every weight decodes as ggml's encoding does
    (and the bytes are ggml's wherever a sub-block's scale is not zero)."""
    cls = ggml_type(qtype)
    for n in (256, 512):
        importance = torch.from_numpy(ref[f"n{n}/imatrix_random"]) if imatrix else None
        for case in _cases(ref, n):
            want = ref[f"n{n}/{case}/{qtype}{imatrix}"]
            x = torch.from_numpy(ref[f"n{n}/{case}/input"])
            got = ef.quantize_with_feedback(cls, x, torch.eye(n), importance).numpy()
            decoded = gguf_quants.dequantize(got, cls.qtype)
            # Equal values (a zero sub-block may decode to -0.0 in one and +0.0 in the other).
            assert np.array_equal(decoded, gguf_quants.dequantize(want, cls.qtype)), case
            step, _ = ef.grid_step_offset(cls, torch.from_numpy(want))
            if bool((step != 0).all()):
                assert np.array_equal(got, want), case


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_identity_second_moments_round_to_nearest_on_the_stored_grid(ref, qtype):
    """Q4_0/Q8_0 with H = I: codes nearest on the stored fp16 grid, so no block's error exceeds ggml's."""
    cls = ggml_type(qtype)
    for case in _cases(ref, 256):
        want = ref[f"n256/{case}/{qtype}"]
        x = ref[f"n256/{case}/input"]
        got = ef.quantize_with_feedback(cls, torch.from_numpy(x), torch.eye(256)).numpy()
        assert np.array_equal(got.reshape(-1, cls.type_size)[:, :2], want.reshape(-1, cls.type_size)[:, :2]), case
        ours = ((gguf_quants.dequantize(got, cls.qtype) - x) ** 2).reshape(-1, 32).sum(1)
        theirs = ((gguf_quants.dequantize(want, cls.qtype) - x) ** 2).reshape(-1, 32).sum(1)
        assert np.all(ours <= theirs * (1 + 1e-6) + 1e-30), case


def _correlated_rows(generator: torch.Generator, n: int, k: int, mixing: torch.Tensor) -> torch.Tensor:
    return torch.randn(n, mixing.shape[0], generator=generator) @ mixing + 0.3 * torch.randn(n, k, generator=generator)


@pytest.mark.parametrize("qtype", FEEDBACK_TYPES)
def test_feedback_lowers_output_error_on_held_out_rows(qtype):
    """Codes chosen against calibration rows lower ||X (W_q - W)^T|| on other rows of the same
    distribution, against the stock encoder; headers stay the stock encoder's kind of bytes."""
    g = torch.Generator().manual_seed(3)
    m, k = 128, 512
    weight = torch.randn(m, k, generator=g)
    mixing = torch.randn(64, k, generator=g)
    calibration = _correlated_rows(g, 1024, k, mixing)
    held_out = _correlated_rows(g, 1024, k, mixing)
    cls = ggml_type(qtype)
    factor = ef.inverse_cholesky_factor(calibration.T @ calibration / calibration.shape[0])
    aware = ef.quantize_with_feedback(cls, weight, factor)
    plain = cls.quantize_rows(weight)
    exact = held_out @ weight.T

    def output_error(data: torch.Tensor) -> float:
        decoded = torch.from_numpy(gguf_quants.dequantize(data.numpy(), cls.qtype).reshape(m, k).copy())
        return float((held_out @ decoded.T - exact).norm() / exact.norm())

    assert output_error(aware) < 0.5 * output_error(plain)


def test_inverse_cholesky_factor_of_a_known_matrix():
    """U with U^T U = (H + damping * mean(diag) I)^-1; a dead channel passes nothing on."""
    h = torch.tensor([[4.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    u = ef.inverse_cholesky_factor(h, damping=0.0)
    damped = torch.tensor([[4.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 3.5]])  # mean live diagonal 3.5
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), atol=1e-6)
    assert torch.allclose(torch.triu(u), u)
    assert float(u[0, 2]) == 0.0 and float(u[1, 2]) == 0.0


def test_inverse_cholesky_factor_damps_more_until_it_factors():
    """An indefinite H (eigenvalues 2.05 and -0.05) fails at 1.01 on the diagonal and factors at
    1.11 (damping 0.01 + ten times that once): U^T U is the inverse of that matrix."""
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    u = ef.inverse_cholesky_factor(h, damping=0.01)
    retried = torch.tensor([[1.11, 1.05], [1.05, 1.11]], dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double(), torch.linalg.inv(retried), rtol=1e-5, atol=1e-5)


def test_inverse_cholesky_factor_of_non_finite_statistics_is_an_error():
    h = torch.eye(4)
    h[1, 2] = h[2, 1] = float("nan")
    with pytest.raises(ValueError, match="does not factor"):
        ef.inverse_cholesky_factor(h, damping=0.01)
