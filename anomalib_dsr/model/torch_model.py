"""DSR torch model (docs/method.md): general VQ-VAE, subspace restriction, D_spc, anomaly detection, upsampling.

Order of operations at inference (``DsrModel.forward``) for an RGB batch in [0, 1], each step with the section
of docs/method.md it implements; shapes for a 3x256x256 input at the paper's widths:

1. flip RGB → BGR: the released weights were trained on BGR input (docs/method.md#input);
2. general VQ-VAE (docs/method.md#shapes): encoder_hi → 128x64x64; encoder_lo → 128x32x32, 1x1 conv → z_lo;
   Q_lo = nearest entry of K_lo by L2; z_hi = 1x1 conv of [encoder_hi output, up(Q_lo)], ``up`` being the
   transposed conv 4x4/2 (this channel order is the released code's; the paper leaves it open);
   Q_hi = nearest entry of K_hi, 128x64x64;
3. I_gen = D_gen([up(Q_lo), Q_hi]), 3x256x256 (docs/method.md#shapes);
4. F̃_lo = restriction_lo(Q_lo), F̃_hi = restriction_hi(Q_hi), re-quantised with the same codebooks to
   Q̃_lo, Q̃_hi; I_spc = D_spc([up(Q̃_lo), Q̃_hi]) with the same frozen ``up`` (docs/method.md#shapes), or
   D_gen([up(Q̃_lo), Q̃_hi]) with ``spc_decoder="general"`` (a departure from the paper);
5. M_lo = anomaly_detection(concat(I_spc, I_gen)), 2x256x256 logits; P_lo = softmax(M_lo) over the two
   channels (docs/method.md#shapes);
6. M = upsampling(concat(I_spc, I_gen, P_lo)) (docs/method.md#shapes);
7. pred_score = max over the image of the 21x21 average of P_lo[:, 1] (stride 1, zero padding 10 counted
   in the average; docs/method.md#inference; the window scales with the image side, see :func:`score_window_for`);
   anomaly_map = softmax(M)[:, 1] (docs/method.md#inference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_dsr.model.anomaly_generator import LatentAnomalyGenerator, blocky
from anomalib_dsr.model.layers import init_normal_
from anomalib_dsr.model.layers.graph_capture import capturing_graph
from anomalib_dsr.model.object_decoder import ObjectSpecificDecoder
from anomalib_dsr.model.subspace_restriction import SubspaceRestriction
from anomalib_dsr.model.unet import UNet
from anomalib_dsr.model.vq_vae import Encoded, GeneralVQVAE

SPC_DECODERS = ("specific", "general")


def check_image_size(height: int, width: int) -> None:
    """Raise a ValueError unless DSR can process ``height x width`` images.

    The subspace restriction modules pool the 1/8 grid twice and upsample it back x4, and their
    InstanceNorm needs more than one cell at 1/32: sides must be multiples of 32, not both 32.
    """
    if height % 32 or width % 32 or height * width <= 32 * 32:
        msg = (
            f"DSR needs image sides that are multiples of 32 and larger than 32x32, got {(height, width)}: "
            "resize to e.g. 256x256 (the paper's size)."
        )
        raise ValueError(msg)


def score_window_for(height: int, width: int) -> tuple[int, int]:
    """The image-score averaging window for a ``height x width`` input: 21x21 at 256x256 (paper,
    docs/method.md#inference), scaled with each side to the nearest odd size, ``2·round(10·side/256) + 1`` (11 at
    128, 41 at 512).

    A deviation for other sizes: a fixed 21x21 window covers 0.7 % of a 256x256 image but 11 % of a 64x64 one,
    which smooths small defects away.
    """
    return 2 * round(10 * height / 256) + 1, 2 * round(10 * width / 256) + 1


def window_max(anomaly: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(B,)``: the maximum of ``anomaly`` ``(B, 1, H, W)`` averaged over ``window`` (stride 1, odd sides, zero
    padding counted in the average).

    Eagerly the average is separable, columns then rows (several times faster than one 2-D pool; the same
    average up to float32 rounding, 1e-6). Exported graphs keep one 2-D pool: NNCF's INT8
    quantisation of the map between two 1-D pools left the demo model's image scores at chance.
    """
    (height, width) = window
    padding = (height // 2, width // 2)
    if capturing_graph():
        smoothed = F.avg_pool2d(anomaly, window, stride=1, padding=padding, count_include_pad=True)
    else:
        smoothed = F.avg_pool2d(anomaly, (height, 1), stride=1, padding=(padding[0], 0), count_include_pad=True)
        smoothed = F.avg_pool2d(smoothed, (1, width), stride=1, padding=(0, padding[1]), count_include_pad=True)
    return smoothed.amax(dim=(1, 2, 3))


class RestrictionTrainingOutput(NamedTuple):
    """What the phase-2 loss needs (docs/method.md#phase-2). Shapes for an input ``(B, 3, H, W)``."""

    restricted_lo: torch.Tensor  # F̃_lo (B, D, H/8, W/8)
    restricted_hi: torch.Tensor  # F̃_hi (B, D, H/4, W/4)
    target_lo: torch.Tensor  # clean Q_lo (B, D, H/8, W/8)
    target_hi: torch.Tensor  # clean Q_hi (B, D, H/4, W/4)
    image_spc: torch.Tensor  # I_spc (B, 3, H, W), BGR
    target_image: torch.Tensor  # the input image (B, 3, H, W), BGR
    logits_lo: torch.Tensor  # M_lo (B, 2, H, W)
    target_mask: torch.Tensor  # blocky ground truth (B, 1, H, W)


class DsrStages(NamedTuple):
    """Every stage of the inference chain (:meth:`DsrModel.stages`). Shapes for an RGB input ``(B, 3, H, W)``."""

    image_gen: torch.Tensor  # I_gen (B, 3, H, W), BGR like the VQ-VAE's input
    image_spc: torch.Tensor  # I_spc (B, 3, H, W), BGR
    probs_lo: torch.Tensor  # P_lo = softmax(M_lo) (B, 2, H, W)
    anomaly_map: torch.Tensor  # softmax(M)[:, 1] (B, H, W)
    pred_score: torch.Tensor  # (B,)


class DsrModel(nn.Module):
    """DSR with the paper's widths as defaults; every width is an argument so tests can build a tiny model.

    Args:
        channels: VQ-VAE width (paper: 128).
        res_hidden: residual-block bottleneck width (paper: 64).
        num_embeddings: entries per codebook K (paper: 4096).
        embedding_dim: code dimension D (paper: 128).
        decoder_bottleneck: D_spc's 1x1 bottleneck width (paper: 64).
        unet_width: base width of both U-Nets (paper: 64).
        latent_anomaly_strength: lower bound of λ (paper: 0.2).
        score_window: side of the averaging window for the image score (paper: 21 at 256x256); ``None``
            scales it with the input size (:func:`score_window_for`).
        channels_last: weights and input in the ``channels_last`` memory layout, in training too (the layout
            tensor cores and oneDNN's bf16 kernels work in); slower on this project's CPU (README "Speed").
            Inference on CPU times Winograd against direct algorithms for the U-Nets' and D_spc's 3x3 convolutions
            either way (:class:`~anomalib_dsr.model.layers.TimedConv3x3`).
        spc_decoder: what decodes the restricted codes into I_spc: ``"specific"``, a D_spc learnt per category
            (paper), or ``"general"``, the frozen D_gen (a departure: no D_spc; where the restriction keeps a code,
            I_spc shows it as I_gen does).
    """

    def __init__(
        self,
        channels: int = 128,
        res_hidden: int = 64,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        decoder_bottleneck: int = 64,
        unet_width: int = 64,
        latent_anomaly_strength: float = 0.2,
        score_window: int | None = None,
        channels_last: bool = False,
        spc_decoder: str = "specific",
    ) -> None:
        super().__init__()
        if spc_decoder not in SPC_DECODERS:
            msg = f"spc_decoder must be one of {SPC_DECODERS}, got {spc_decoder!r}."
            raise ValueError(msg)
        self.vq = GeneralVQVAE(channels, res_hidden, num_embeddings, embedding_dim)
        self.vq.requires_grad_(False)
        self.vq.eval()  # frozen from the start: Lightning >= 2.2 keeps the modes modules have when fitting starts
        self.restriction_lo = SubspaceRestriction(embedding_dim)
        self.restriction_hi = SubspaceRestriction(embedding_dim)
        self.object_decoder = (
            ObjectSpecificDecoder(2 * embedding_dim, decoder_bottleneck, channels, res_hidden)
            if spc_decoder == "specific"
            else None
        )
        self.anomaly_detection = UNet(6, unet_width)
        init_normal_(self.anomaly_detection)  # docs/method.md#modules: N(0, 0.02)
        self.upsampling = UNet(8, unet_width)
        self.latent_anomalies = LatentAnomalyGenerator(latent_anomaly_strength)
        self.score_window = score_window
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> DsrModel:
        """The general VQ-VAE stays in eval mode: its codebooks must not move (docs/method.md#phase-2)."""
        super().train(mode)
        self.vq.eval()
        return self

    @staticmethod
    def to_vq_input(images: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, H, W)`` → BGR, the channel order of the released VQ-VAE (docs/method.md#input)."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"DSR expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        check_image_size(*images.shape[-2:])
        return images.flip(1)

    def vq_input(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`to_vq_input` in the layout of this model's quantising modules, whatever the input's layout
        (convolutions follow their input's)."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.to_vq_input(images).contiguous(memory_format=layout)

    def restrict(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Subspace restriction and re-quantisation: F̃_lo, F̃_hi and D_spc's input [up(Q̃_lo), Q̃_hi]
        ``(B, 2D, H/4, W/4)``.

        Always in float32, also under autocast (training and inference alike): it ends in a code choice.
        """
        with torch.autocast(q_lo.device.type, enabled=False):
            restricted_lo = self.restriction_lo(q_lo)
            restricted_hi = self.restriction_hi(q_hi)
            joined = self.vq.join(
                self.vq.codebook_lo.quantize(restricted_lo), self.vq.codebook_hi.quantize(restricted_hi)
            )
        return restricted_lo, restricted_hi, joined

    def decode_spc(self, joined: torch.Tensor) -> torch.Tensor:
        """I_spc ``(B, 3, H, W)`` from [up(Q̃_lo), Q̃_hi] ``(B, 2D, H/4, W/4)``: D_spc, or the frozen D_gen."""
        decoder = self.vq.decoder if self.object_decoder is None else self.object_decoder
        return decoder(joined)

    def restore(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Subspace restriction and I_spc's decoder: returns F̃_lo, F̃_hi and I_spc ``(B, 3, H, W)``."""
        restricted_lo, restricted_hi, joined = self.restrict(q_lo, q_hi)
        return restricted_lo, restricted_hi, self.decode_spc(joined)

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1–5 on RGB images: returns I_spc, I_gen and P_lo = softmax(M_lo) ``(B, 2, H, W)``.

        Under bf16 autocast everything up to the last code choice (the VQ encoders and the restriction modules) still
        runs in float32, so the codes are fp32's; the decoders and U-Nets, most of the work, run in bf16 and in the
        channels_last layout of oneDNN's bf16 kernels (NCHW costs a transposing copy around each convolution;
        docs/speed.md).
        """
        device = images.device.type
        encoded = self.vq.encode(self.vq_input(images))
        _, _, joined_spc = self.restrict(encoded.q_lo, encoded.q_hi)
        joined_gen = torch.cat((encoded.up_lo, encoded.q_hi), dim=1)  # = join(Q_lo, Q_hi)
        if torch.is_autocast_enabled(device) and not self.training:
            joined_gen, joined_spc = (x.contiguous(memory_format=torch.channels_last) for x in (joined_gen, joined_spc))
        image_gen = self.vq.decoder(joined_gen)
        image_spc = self.decode_spc(joined_spc)
        probs_lo = self.anomaly_detection(torch.cat((image_spc, image_gen), dim=1)).softmax(dim=1)
        return image_spc, image_gen, probs_lo

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """RGB ``(B, 3, H, W)`` in [0, 1] → ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, H, W)``."""
        stages = self.stages(images)
        return InferenceBatch(pred_score=stages.pred_score, anomaly_map=stages.anomaly_map)

    def stages(self, images: torch.Tensor) -> DsrStages:
        """Steps 1–7 on RGB ``(B, 3, H, W)`` in [0, 1], keeping the intermediate images and maps (``anomalib-dsr
        inspect``); :meth:`forward` returns its last two fields."""
        image_spc, image_gen, probs_lo = self.detect(images)
        probs = self.upsampling(torch.cat((image_spc, image_gen, probs_lo), dim=1)).softmax(dim=1)
        return DsrStages(image_gen, image_spc, probs_lo, probs[:, 1], self.image_score(probs_lo))

    def image_score(self, probs_lo: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the maximum of P_lo's anomaly channel averaged over the score window (docs/method.md#inference)."""
        window = score_window_for(*probs_lo.shape[-2:]) if self.score_window is None else (self.score_window,) * 2
        return window_max(probs_lo[:, 1:], window)

    def forward_restriction_training(self, images: torch.Tensor, masks: torch.Tensor) -> RestrictionTrainingOutput:
        """Phase 2 (docs/method.md#phase-2): inject latent anomalies inside ``masks`` ``(B, 1, H, W)``, then restore.

        Per image the levels are "both" (lo first; hi re-computed from the anomalous Q_lo, then hi
        anomalies on top), "lo only" (hi stays the clean quantisation) or "hi only" (anomalies on the
        hi features of the clean lo). The ground truth is the mask at the deciding level's grid.
        """
        generator = self.latent_anomalies
        with torch.no_grad():
            # Codes and replacement codes in float32 under autocast too, as at inference: bf16 moves codes.
            with torch.autocast(images.device.type, enabled=False):
                images = self.vq_input(images)
                encoded = self.vq.encode(images)
                lo_on, hi_on = generator.sample_levels(images.shape[0], images.device)
                mask_lo = blocky(masks, 8) * lo_on.view(-1, 1, 1, 1)
                q_lo = generator.replace(self.vq.codebook_lo, encoded.z_lo, encoded.q_lo, mask_lo)
                up_lo, z_hi, q_hi = self.hi_after_lo_anomalies(encoded, q_lo, mask_lo, lo_on & hi_on)
                mask_hi = blocky(masks, 4) * hi_on.view(-1, 1, 1, 1)
                q_hi = generator.replace(self.vq.codebook_hi, z_hi, q_hi, mask_hi)

                hi_only = (hi_on & ~lo_on).view(-1, 1, 1, 1)
                target_mask = torch.where(
                    hi_only,
                    F.interpolate(mask_hi, scale_factor=4, mode="nearest"),
                    F.interpolate(mask_lo, scale_factor=8, mode="nearest"),
                )
            image_gen = self.vq.decoder(torch.cat((up_lo, q_hi), dim=1))  # = D_gen(join(Q_lo, Q_hi))

        restricted_lo, restricted_hi, image_spc = self.restore(q_lo, q_hi)
        logits_lo = self.anomaly_detection(torch.cat((image_spc.detach(), image_gen), dim=1))
        return RestrictionTrainingOutput(
            restricted_lo, restricted_hi, encoded.q_lo, encoded.q_hi, image_spc, images, logits_lo, target_mask
        )

    def hi_after_lo_anomalies(
        self, encoded: Encoded, q_lo: torch.Tensor, mask_lo: torch.Tensor, both: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """up(Q_lo) of the anomalous ``q_lo``, and z_hi, Q_hi: re-computed from it for the images with ``both``
        levels ``(B,)``, the clean ones for the others.

        Only images whose Q_lo changed (``mask_lo`` ``(B, 1, h, w)`` not empty) differ from the clean
        encoding; on CPU only those are recomputed (indexing costs no device synchronisation there), on
        other devices the whole batch is, with ``torch.where``, so the step never waits for the device.
        """
        vq = self.vq
        changed = mask_lo.flatten(1).amax(1) > 0
        if q_lo.device.type != "cpu":
            up_lo = vq.upsample_lo(q_lo)
            z_new = vq.hi_features_from_up(up_lo, encoded.features_hi)
            select = both.view(-1, 1, 1, 1)
            return (
                up_lo,
                torch.where(select, z_new, encoded.z_hi),
                torch.where(select, vq.codebook_hi.quantize(z_new), encoded.q_hi),
            )
        up_lo, z_hi, q_hi = encoded.up_lo, encoded.z_hi, encoded.q_hi
        if (rows := changed.nonzero().squeeze(1)).numel():
            up_lo = up_lo.index_copy(0, rows, vq.upsample_lo(q_lo[rows]))
        if (rows := (changed & both).nonzero().squeeze(1)).numel():
            z_new = vq.hi_features_from_up(up_lo[rows], encoded.features_hi[rows])
            z_hi = z_hi.index_copy(0, rows, z_new)
            q_hi = q_hi.index_copy(0, rows, vq.codebook_hi.quantize(z_new))
        return up_lo, z_hi, q_hi

    def forward_upsampling_training(self, images: torch.Tensor) -> torch.Tensor:
        """Phase 3 (docs/method.md#phase-3): logits M ``(B, 2, H, W)``; only the upsampling module gets gradients."""
        with torch.no_grad():
            image_spc, image_gen, probs_lo = self.detect(images)
        return self.upsampling(torch.cat((image_spc, image_gen, probs_lo), dim=1))
