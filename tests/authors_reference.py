"""The authors' DSR inference, for the faithfulness tests: written from their released code
(``VitjanZ/DSR_anomaly_detection``: ``discrete_model.py``, ``dsr_model.py``, ``test_dsr.py``), not from this
package's building blocks.

Every module has the authors' attribute names, so state dicts in the layout of their released files
(``tests/data/original_checkpoint_keys.txt``) load with ``load_state_dict(strict=True)``. Kept from their code on
purpose, because each can change results: ``nn.InstanceNorm2d``; the residual blocks' first ReLU in place (the
skip then adds the rectified input); the ReLU after encoder_lo's 3x3 conv; the quantiser's distance formula, its
one-hot matrix product and straight-through sum ``z + (q - z)``; their module order in ``test_dsr.py``. Widths are
arguments (defaults: the released files') so that tiny models can be checked too; the authors fix the U-Net
width and D_spc's bottleneck at 64.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def conv_norm_relu(*widths: int) -> list[nn.Module]:
    """[conv 3x3, ``nn.InstanceNorm2d``, in-place ReLU] from ``widths[i]`` to ``widths[i + 1]`` channels."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out), nn.ReLU(inplace=True)]
    return layers


def double_block(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Their ``block*``/``db*``: two conv-norm-ReLU, convolutions at indices 0 and 3."""
    return nn.Sequential(*conv_norm_relu(c_in, c_mid, c_out))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Their ``up*``: bilinear x2 (align_corners) then conv-norm-ReLU, the convolution at index 1."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_norm_relu(c_in, c_out))


# ------------------------------------------------------------------------------------ discrete_model.py
class VectorQuantizerEMA(nn.Module):
    """Their EMA quantiser in eval mode: features ``(B, D, h, w)`` → straight-through codes, same shape.

    Not theirs: each call's features and chosen indices ``(B, h, w)`` are appended to ``seen``, so that the tests
    can compare every code choice with ours (:attr:`AuthorsDsr.codes`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._ema_w = nn.Parameter(torch.empty(num_embeddings, embedding_dim))  # EMA state: unused at inference
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        nhwc = inputs.permute(0, 2, 3, 1).contiguous()
        flat = nhwc.view(-1, nhwc.shape[-1])
        codebook = self._embedding.weight
        distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * torch.matmul(flat, codebook.t())
        indices = distances.argmin(1)
        self.seen.append((inputs, indices.view(nhwc.shape[:-1])))
        one_hot = F.one_hot(indices, codebook.shape[0]).to(flat.dtype)
        quantized = torch.matmul(one_hot, codebook).view(nhwc.shape)
        quantized = nhwc + (quantized - nhwc).detach()
        return quantized.permute(0, 3, 1, 2).contiguous()


class Residual(nn.Module):
    """``x + block(x)`` where the block's first ReLU is in place: the sum reads the rectified ``x``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self._block = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._block(x)


class ResidualStack(nn.Module):
    """Two residual blocks, then a ReLU; shape preserving."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self._layers = nn.ModuleList(Residual(channels, hidden) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class EncoderBot(nn.Module):
    """Encoder_hi: ``(B, 3, H, W)`` → ``(B, C, H/4, W/4)``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(3, channels // 2, 4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(channels // 2, channels, 4, stride=2, padding=1)
        self._conv_3 = nn.Conv2d(channels, channels, 3, padding=1)
        self._residual_stack = ResidualStack(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_2(F.relu(self._conv_1(x))))
        return self._residual_stack(self._conv_3(x))


class EncoderTop(nn.Module):
    """Encoder_lo: ``(B, C, H/4, W/4)`` → ``(B, C, H/8, W/8)``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(channels, channels, 4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(channels, channels, 3, padding=1)
        self._residual_stack = ResidualStack(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual_stack(F.relu(self._conv_2(F.relu(self._conv_1(x)))))


class DecoderBot(nn.Module):
    """D_gen, and the tail of D_spc: ``(B, in, h, w)`` → image ``(B, 3, 4h, 4w)``."""

    def __init__(self, in_channels: int, channels: int, hidden: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self._residual_stack = ResidualStack(channels, hidden)
        self._conv_trans_1 = nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(channels // 2, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class DiscreteLatentModel(nn.Module):
    """The general VQ-VAE (``vq_model_pretrained_128_4096.pckl``)."""

    def __init__(self, channels: int, hidden: int, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self._encoder_t = EncoderTop(channels, hidden)
        self._encoder_b = EncoderBot(channels, hidden)
        self._pre_vq_conv_bot = nn.Conv2d(channels + embedding_dim, embedding_dim, 1)
        self._pre_vq_conv_top = nn.Conv2d(channels, embedding_dim, 1)
        self._vq_vae_top = VectorQuantizerEMA(num_embeddings, embedding_dim)
        self._vq_vae_bot = VectorQuantizerEMA(num_embeddings, embedding_dim)
        self._decoder_b = DecoderBot(2 * embedding_dim, channels, hidden)
        self.upsample_t = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BGR ``(B, 3, H, W)`` → straight-through Q_lo ``(B, D, H/8, W/8)`` and Q_hi ``(B, D, H/4, W/4)``.

        Their forward also returns the commitment losses and decodes I_gen, which ``test_dsr.py`` does not use.
        """
        enc_b = self._encoder_b(x)
        q_lo = self._vq_vae_top(self._pre_vq_conv_top(self._encoder_t(enc_b)))
        q_hi = self._vq_vae_bot(self._pre_vq_conv_bot(torch.cat((enc_b, self.upsample_t(q_lo)), dim=1)))
        return q_lo, q_hi


# ----------------------------------------------------------------------------------------- dsr_model.py
class SubspaceRestrictionNetwork(nn.Module):
    """Their ``unet`` of the restriction module: 3-level encoder, decoder without skips, linear end."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.block1 = double_block(width, width, width)
        self.encoder.block2 = double_block(width, 2 * width, 2 * width)
        self.encoder.block3 = double_block(2 * width, 4 * width, 4 * width)
        self.decoder = nn.Module()
        self.decoder.up2 = up_block(4 * width, 2 * width)
        self.decoder.db2 = double_block(2 * width, 2 * width, 2 * width)
        self.decoder.up3 = up_block(2 * width, width)
        self.decoder.db3 = double_block(width, width, width)
        self.decoder.fin_out = nn.Sequential(nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, d = self.encoder, self.decoder
        x = e.block3(F.max_pool2d(e.block2(F.max_pool2d(e.block1(x), 2)), 2))
        return d.fin_out(d.db3(d.up3(d.db2(d.up2(x)))))


class SubspaceRestrictionModule(nn.Module):
    """``(B, D, h, w)`` → (restricted features F̃, their straight-through re-quantisation), both that shape."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.unet = SubspaceRestrictionNetwork(embedding_dim)

    def forward(self, x: torch.Tensor, quantizer: VectorQuantizerEMA) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.unet(x)
        return x, quantizer(x)


class ImageReconstructionNetwork(DecoderBot):
    """D_spc: ``(B, in, H/4, W/4)`` → image ``(B, 3, H, W)``; its tail has D_gen's structure and names."""

    def __init__(self, in_channels: int, channels: int, hidden: int, bottleneck: int = 64) -> None:
        super().__init__(bottleneck, channels, hidden)
        self.block1 = double_block(in_channels, in_channels, 2 * in_channels)
        self.block2 = double_block(2 * in_channels, 2 * in_channels, 4 * in_channels)
        self.pre_vq_conv = nn.Conv2d(4 * in_channels, bottleneck, 1)
        self.upblock1 = nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1)
        self.upblock2 = nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block2(F.max_pool2d(self.block1(x), 2)), 2)
        x = F.relu(self.upblock2(F.relu(self.upblock1(self.pre_vq_conv(x)))))
        return super().forward(x)


class UnetModel(nn.Module):
    """Their 4-level U-Net: ``(B, in, H, W)`` → ``(B, out, H, W)``; skips concatenated after each upsampling."""

    def __init__(self, in_channels: int, out_channels: int = 2, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.block1 = double_block(in_channels, width, width)
        self.encoder.block2 = double_block(width, 2 * width, 2 * width)
        self.encoder.block3 = double_block(2 * width, 4 * width, 4 * width)
        self.encoder.block4 = double_block(4 * width, 4 * width, 4 * width)
        self.decoder = nn.Module()
        self.decoder.up1 = up_block(4 * width, 4 * width)
        self.decoder.db1 = double_block(8 * width, 4 * width, 4 * width)
        self.decoder.up2 = up_block(4 * width, 2 * width)
        self.decoder.db2 = double_block(4 * width, 2 * width, 2 * width)
        self.decoder.up3 = up_block(2 * width, width)
        self.decoder.db3 = double_block(2 * width, width, width)
        self.decoder.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, d = self.encoder, self.decoder
        b1 = e.block1(x)
        b2 = e.block2(F.max_pool2d(b1, 2))
        b3 = e.block3(F.max_pool2d(b2, 2))
        x = e.block4(F.max_pool2d(b3, 2))
        x = d.db1(torch.cat((d.up1(x), b3), dim=1))
        x = d.db2(torch.cat((d.up2(x), b2), dim=1))
        x = d.db3(torch.cat((d.up3(x), b1), dim=1))
        return d.fin_out(x)


class SegmentationModule(nn.Module):
    """Their ``AnomalyDetectionModule`` (6 input channels) and ``UpsamplingModule`` (8): a U-Net on the
    concatenated inputs."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.unet = UnetModel(in_channels, 2, width)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat(images, dim=1))


# ------------------------------------------------------------------------------------------ test_dsr.py
class AuthorsDsr(nn.Module):
    """The six modules ``test_dsr.py`` loads, one attribute per released file (see :data:`FILES`)."""

    FILES: ClassVar[dict[str, str]] = {
        "vq_model_pretrained_128_4096.pckl": "model_vq",
        "DSR_subspace_restriction_hi_{category}.pckl": "sub_res_hi_module",
        "DSR_subspace_restriction_lo_{category}.pckl": "sub_res_lo_module",
        "DSR_image_recon_module_{category}.pckl": "image_recon_module",
        "DSR_anomaly_det_module_{category}.pckl": "anom_det_module",
        "DSR_upsample_module_{category}.pckl": "upsample_module",
    }

    def __init__(
        self,
        channels: int = 128,
        res_hidden: int = 64,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        decoder_bottleneck: int = 64,
        unet_width: int = 64,
    ) -> None:
        super().__init__()
        self.model_vq = DiscreteLatentModel(channels, res_hidden, num_embeddings, embedding_dim)
        self.sub_res_hi_module = SubspaceRestrictionModule(embedding_dim)
        self.sub_res_lo_module = SubspaceRestrictionModule(embedding_dim)
        self.image_recon_module = ImageReconstructionNetwork(
            2 * embedding_dim, channels, res_hidden, decoder_bottleneck
        )
        self.anom_det_module = SegmentationModule(6, unet_width)
        self.upsample_module = SegmentationModule(8, unet_width)
        self.eval()

    def load_files(self, states: dict[str, dict[str, torch.Tensor]]) -> AuthorsDsr:
        """Load one state dict per file name of :data:`FILES` with ``strict=True`` (``test_dsr.py`` loads the image
        reconstruction module with ``strict=False``, but every released key matches)."""
        for file_name, attribute in self.FILES.items():
            getattr(self, attribute).load_state_dict(states[file_name], strict=True)
        return self

    @torch.no_grad()
    def forward(self, bgr: torch.Tensor) -> dict[str, torch.Tensor]:
        """``evaluate_model`` of ``test_dsr.py`` on a BGR batch ``(B, 3, H, W)`` in [0, 1].

        Returns ``pred_score`` ``(B,)`` (the max of the 21x21 average of softmax(M_lo)'s anomaly channel,
        zero padding counted; they take the max over their batch of one) and ``anomaly_map`` ``(B, H, W)``
        (softmax(M)'s anomaly channel, uncropped: their 224 centre crop is for the pixel metrics only).
        """
        vq = self.model_vq
        vq._vq_vae_top.seen.clear()
        vq._vq_vae_bot.seen.clear()
        q_lo, q_hi = vq(bgr)
        _, q_hi_restricted = self.sub_res_hi_module(q_hi.clone(), vq._vq_vae_bot)
        _, q_lo_restricted = self.sub_res_lo_module(q_lo.clone(), vq._vq_vae_top)
        image_spc = self.image_recon_module(torch.cat((vq.upsample_t(q_lo_restricted), q_hi_restricted), dim=1))
        image_gen = vq._decoder_b(torch.cat((vq.upsample_t(q_lo), q_hi), dim=1))
        probs_lo = torch.softmax(self.anom_det_module(image_spc, image_gen), dim=1)
        probs = torch.softmax(self.upsample_module(image_spc, image_gen, probs_lo), dim=1)
        averaged = F.avg_pool2d(probs_lo[:, 1:], 21, stride=1, padding=21 // 2)
        return {"pred_score": averaged.amax(dim=(1, 2, 3)), "anomaly_map": probs[:, 1], **self.codes()}

    def codes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Stage → (features ``(B, D, h, w)``, chosen indices ``(B, h, w)``) of the last forward's four quantisations.
        Each codebook quantises twice, first the encoder's features, then the restricted ones."""
        (lo, restricted_lo), (hi, restricted_hi) = self.model_vq._vq_vae_top.seen, self.model_vq._vq_vae_bot.seen
        return {
            "codes_lo": lo,
            "codes_hi": hi,
            "restricted_codes_lo": restricted_lo,
            "restricted_codes_hi": restricted_hi,
        }
