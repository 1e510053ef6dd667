"""Fixtures for the kernel tests; helpers live in kernel_helpers.py."""
import pytest


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles much smaller than the shapes, so every tail (T, V and H remainders) is exercised."""
    from fastebm.kernels import fused_linear_logprobs as linear_logprobs

    monkeypatch.setattr(linear_logprobs, "TILES_INTERPRET",
                        dict(fwd_m=16, fwd_v=32, fwd_k=16, bwd_m=16, bwd_v=32, bwd_k=16, dz_m=16, dz_v=32, dz_k=16,
                             num_warps=4, num_stages=1))
    # "gemm" panels smaller than the shapes too: several row and column panels, ragged last ones
    monkeypatch.setattr(linear_logprobs, "PANEL_INTERPRET", (16, 192))
    monkeypatch.setattr(linear_logprobs, "PANEL_CPU", (8, 320))
