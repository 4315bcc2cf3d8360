"""The general VQ-VAE's codebook: nearest-code search in bounded memory."""

from __future__ import annotations

import torch

from anomalib_dsr.model.vq_vae import EMACodebook


def test_nearest_in_blocks_gives_the_indices_of_the_whole_distance_matrix() -> None:
    """4096 codes: blocks of 1024 features (16 MiB of distances); 2,500 features make three blocks, the last
    partial, and every index equals the argmin over the whole matrix, ties included: of equally near codes the
    first, as argmin (the search takes ``min``'s index, which is faster on CPU)."""
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
    assert torch.equal(found.flatten(), whole)
    assert (found[0, 0, :5] == 7).all()
    assert (found[0, 49] == 40).all()
