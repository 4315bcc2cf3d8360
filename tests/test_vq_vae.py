"""The general VQ-VAE's codebook: nearest-code search in bounded memory."""

from __future__ import annotations

import torch

from anomalib_dsr.model.vq_vae import EMACodebook


def test_nearest_in_blocks_gives_the_indices_of_the_whole_distance_matrix() -> None:
    """4096 codes: blocks of 1024 features (16 MiB of distances); 2,500 features make three blocks, the last
    partial, and every index is the argmin over the whole matrix (or a code as near within float32 rounding), ties
    included: of equal codes the first, as argmin (the search takes ``min``'s index, which is faster on CPU)."""
    torch.manual_seed(0)
    codebook = EMACodebook(4096, 16)
    codebook.embedding.weight[[1500, 4095]] = codebook.embedding.weight[40].clone()  # three equal codes
    z = torch.randn(1, 16, 50, 50)
    z[0, :, 0, :5] = codebook.embedding.weight[7].view(16, 1)  # exact hits
    z[0, :, 49, :] = codebook.embedding.weight[40].view(16, 1) + 1e-3 * torch.randn(16, 50)  # ties: 40, 1500, 4095
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    whole = codebook.squared_distances(flat).argmin(1)
    found = codebook.nearest(z)
    assert found.shape == (1, 50, 50)
    # The blocks are other matrix products than the whole matrix (another blocking: on some CPUs another summation
    # order), so an index may differ only where two codes are equally near within float32 rounding: a distance
    # |z|² + |c|² − 2 z·c errs by at most (D + 2)·eps32/2·(|z| + |c|)² ≈ 2e-4 here (D = 16, |z|² and |c|² up to
    # ~45), so a flip needs two codes within 4e-4, checked in float64 with 1e-3. A wrong index (a block read at
    # the wrong offset) points to a code ~20 farther than the nearest, at least ~1.
    exact = codebook.squared_distances(flat.double())
    rows = torch.arange(len(flat))
    tied = (exact[rows, found.flatten()] - exact[rows, whole]).abs() <= 1e-3
    assert ((found.flatten() == whole) | tied).all()
    assert (found[0, 0, :5] == 7).all()
    # exact by construction: three equal codes are equal columns of one product, equal distances bit for bit, and the
    # search keeps the first index of a minimum
    assert (found[0, 49] == 40).all()
