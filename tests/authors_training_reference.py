"""The authors' DSR training steps (phases 2 and 3), for ``test_training_faithfulness.py``: written from their released
training code (``VitjanZ/DSR_anomaly_detection``: ``train_dsr.py``'s ``train_on_device`` loop, its
``generate_fake_anomalies_joined`` and ``train_upsampling_module`` loop; ``loss.py``'s ``FocalLoss``;
``data_loader.py``'s ``TrainWholeImageDataset`` and ``MVTecImageAnomTrainDataset``), in their order of operations, on
the modules of ``authors_reference.py``.

Every random draw they take, in the data loaders and in the loop, is an input here (:class:`LatentDraws`,
:class:`ImageDraws`), so that a test can give the same draws to our step. Where they draw an integer
(``torch.randint(n)``) the input is a uniform variate ``u`` in [0, 1) and the integer is ``floor(u·n)``, the same
distribution. The image rotations (imgaug) and the Perlin noise are not re-implemented: the steps take the rotated
image and the thresholded noise as given.

Their tensors are float32 throughout, some made so explicitly (``torch.FloatTensor``, ``.float()``, ``torch.zeros``);
here such tensors take the dtype of the data, so that the whole step can run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from authors_reference import AuthorsDsr

ANOM_PAR = 0.2  # train_on_device's anom_par: the lower bound of λ
NEAREST_EXCLUDED = 0.05  # the share of nearest codes generate_fake_anomalies_joined slices off
MAX_BETA = 0.8  # MVTecImageAnomTrainDataset.augment_image: β = 0.8·u
LEARNING_RATE = 2e-4  # train_dsr.py's usage line: --lr 0.0002


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Their ``FocalLoss()`` as both loops build it (no nonlinearity, ``alpha=None``: 1 for each class), on
    probabilities ``(B, C, H, W)`` and a class map ``(B, 1, H, W)`` → mean over pixels."""
    num_class = probs.shape[1]
    flat = probs.view(probs.shape[0], num_class, -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    idx = target.squeeze(1).reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], num_class, dtype=probs.dtype).scatter_(1, idx, 1)
    one_hot = torch.clamp(one_hot, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(1) + smooth
    alpha = torch.ones(num_class, 1, dtype=probs.dtype)[idx].squeeze()
    return (-1 * alpha * torch.pow(1 - pt, gamma) * pt.log()).mean()


def fake_anomalies(
    features: torch.Tensor,
    quantized: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor,
    strength: torch.Tensor,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """``generate_fake_anomalies_joined``: ``quantized`` ``(B, D, h, w)`` with, inside ``mask`` ``(B, 1, H, W)``
    max-pooled to the ``h x w`` grid, the code drawn for each cell.

    Per image, every cell's pre-quantisation feature (``features``, same shape) ranks the codes ``(K, D)`` by L2
    distance; the window is the ranks ``[⌊0.05·K⌋, min(⌊λ·K⌋ + 1, K − 1))`` with λ = ``strength`` ``(B,)``;
    the cell takes the window's entry ``⌊u·len⌋``, ``u`` = ``ranks`` ``(B, h, w)`` (their
    ``torch.randint(len)``).
    """
    b, d, h, w = quantized.shape
    k = codebook.shape[0]
    inputs = features.permute(0, 2, 3, 1).contiguous()
    replacements = torch.zeros(b, h * w, d, dtype=quantized.dtype)
    for i in range(b):
        flat = inputs[i].view(-1, d)
        distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * torch.matmul(flat, codebook.t())
        topk = max(1, min(int(strength[i] * k) + 1, k - 1))
        _, nearest = torch.topk(distances, topk, dim=1, largest=False)
        window = nearest[:, int(k * NEAREST_EXCLUDED) :]
        picks = (ranks[i].flatten() * window.shape[1]).long()
        replacements[i] = codebook[window[torch.arange(picks.shape[0]), picks], :]
    replacements = replacements.reshape(b, h, w, d).permute(0, 3, 1, 2)
    cells = F.max_pool2d(mask, (mask.shape[2] // h, mask.shape[3] // w)).to(quantized.dtype)
    return cells * replacements + (1.0 - cells) * quantized


def blocky_target(mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The loop's ground truth at a level: ``mask`` ``(B, 1, H, W)`` max-pooled to the grid of ``grid``
    ``(B, D, h, w)`` (the ratio read off the widths, as theirs) and nearest-upsampled back."""
    ratio = mask.shape[3] // grid.shape[3]
    return F.interpolate(F.max_pool2d(mask, (ratio, ratio)), scale_factor=ratio)


@dataclass
class LatentDraws:
    """The draws of one phase-2 step of ``train_on_device``; uniforms in [0, 1) unless said otherwise.

    Their two hi-level calls (hi anomalies on the hi features of the anomalous lo, and on those of the clean lo)
    draw their ranks independently, but each image keeps the result of only one of them; so one ``ranks_hi`` field
    serves both, with the same distribution of what is kept.
    """

    strength_lo: torch.Tensor  # (B,): λ_lo = u·(1 − anom_par) + anom_par
    strength_hi: torch.Tensor  # (B,): λ_hi
    ranks_lo: torch.Tensor  # (B, H/8, W/8): the replacement's place in its window, per lo cell
    ranks_hi: torch.Tensor  # (B, H/4, W/4): per hi cell
    use_both: torch.Tensor  # (B,) in {0, 1}: their torch.randint(0, 2)
    use_lo: torch.Tensor  # (B,) in {0, 1}: with use_both = 0, lo only (1) or hi only (0)


def restriction_losses(
    authors: AuthorsDsr, image: torch.Tensor, mask: torch.Tensor, draws: LatentDraws
) -> dict[str, torch.Tensor]:
    """One pass of ``train_on_device``'s loop up to ``loss``: BGR images ``(B, 3, H, W)`` in [0, 1] and masks
    ``(B, 1, H, W)`` (``TrainWholeImageDataset``'s, already emptied for normal samples) → ``focal``,
    ``feature_hi``, ``feature_lo``, ``image`` (with its weight 10) and their sum ``loss``."""
    model = authors.model_vq
    embedder_hi, embedder_lo = model._vq_vae_bot, model._vq_vae_top
    with torch.no_grad():
        strength_lo = draws.strength_lo * (1.0 - ANOM_PAR) + ANOM_PAR
        strength_hi = draws.strength_hi * (1.0 - ANOM_PAR) + ANOM_PAR
        enc_b = model._encoder_b(image)
        zt = model._pre_vq_conv_top(model._encoder_t(enc_b))
        quantized_t = embedder_lo(zt)
        anomaly_lo = fake_anomalies(zt, quantized_t, embedder_lo._embedding.weight, mask, strength_lo, draws.ranks_lo)

        zb = model._pre_vq_conv_bot(torch.cat((enc_b, model.upsample_t(anomaly_lo)), dim=1))
        zb_real = model._pre_vq_conv_bot(torch.cat((enc_b, model.upsample_t(quantized_t)), dim=1))
        quantized_b = embedder_hi(zb)
        quantized_b_real = embedder_hi(zb_real)
        codebook_hi = embedder_hi._embedding.weight
        anomaly_hi_both = fake_anomalies(zb, quantized_b, codebook_hi, mask, strength_hi, draws.ranks_hi)

        use_both = draws.use_both.view(-1, 1, 1, 1).to(image.dtype)
        use_lo = draws.use_lo.view(-1, 1, 1, 1).to(image.dtype)
        use_hi = 1 - use_lo
        anomaly_hi_usebot = fake_anomalies(zb_real, quantized_b_real, codebook_hi, mask, strength_hi, draws.ranks_hi)
        hi_not_both = use_hi * anomaly_hi_usebot + use_lo * quantized_b_real
        lo_not_both = use_hi * quantized_t + use_lo * anomaly_lo
        anomaly_hi = (anomaly_hi_both * use_both + hi_not_both * (1.0 - use_both)).detach().clone()
        anomaly_lo = (anomaly_lo * use_both + lo_not_both * (1.0 - use_both)).detach().clone()

    recon_feat_hi, recon_embeddings_hi = authors.sub_res_hi_module(anomaly_hi.clone(), embedder_hi)
    recon_feat_lo, recon_embeddings_lo = authors.sub_res_lo_module(anomaly_lo.clone(), embedder_lo)
    recon_image_general = model._decoder_b(torch.cat((model.upsample_t(anomaly_lo), anomaly_hi), dim=1))
    quant_join = torch.cat((model.upsample_t(recon_embeddings_lo), recon_embeddings_hi), dim=1)
    recon_image_recon = authors.image_recon_module(quant_join)
    out_mask = authors.anom_det_module(recon_image_recon.detach(), recon_image_general.detach())
    out_mask_sm = torch.softmax(out_mask, dim=1)

    terms = {
        "feature_hi": F.mse_loss(recon_feat_hi, quantized_b_real.detach()),
        "feature_lo": F.mse_loss(recon_feat_lo, quantized_t.detach()),
        "image": F.mse_loss(image, recon_image_recon) * 10,
    }
    mask_hi, mask_lo = blocky_target(mask, quantized_b), blocky_target(mask, quantized_t)
    target = mask_lo * use_both + (mask_lo * use_lo + mask_hi * use_hi) * (1.0 - use_both)
    terms["focal"] = focal_loss(out_mask_sm, target)
    terms["loss"] = terms["focal"] + (terms["feature_lo"] + terms["feature_hi"] + terms["image"])
    return terms


def restriction_optimizer(authors: AuthorsDsr, lr: float = LEARNING_RATE) -> torch.optim.Adam:
    """``train_on_device``'s Adam: one group per trained module, each at ``lr``. Its LR drop after 80 % of the epochs
    is not modelled: a few steps never reach it."""
    modules = (
        authors.sub_res_lo_module,
        authors.sub_res_hi_module,
        authors.image_recon_module,
        authors.anom_det_module,
    )
    return torch.optim.Adam([{"params": module.parameters(), "lr": lr} for module in modules])


@dataclass
class ImageDraws:
    """The draws of ``MVTecImageAnomTrainDataset.augment_image`` for a batch (after its rotation of the image)."""

    perlin: torch.Tensor  # (B, 1, H, W) in {0, 1}: the rotated Perlin noise thresholded at 0.5
    colour: torch.Tensor  # (B, 3): their np.random.rand(1, 1, 3), in the images' BGR order
    beta: torch.Tensor  # (B,): β = 0.8·u
    normal: torch.Tensor  # (B,) bool: their no_anomaly (the sample is returned unchanged with an empty mask)


def image_anomalies(image: torch.Tensor, draws: ImageDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment_image`` on each BGR image of ``image`` ``(B, 3, H, W)`` in [0, 1] → (augmented images, masks
    ``(B, 1, H, W)``)."""
    augmented, masks = [], []
    for img, perlin_thr, colour, u, no_anomaly in zip(image, draws.perlin, draws.colour, draws.beta, draws.normal):
        if no_anomaly:
            augmented.append(img)
            masks.append(torch.zeros_like(perlin_thr))
            continue
        img_thr = torch.ones_like(img) * colour.view(3, 1, 1) * 255 * perlin_thr / 255.0
        beta = u * MAX_BETA
        blended = img * (1 - perlin_thr) + (1 - beta) * img_thr + beta * img * perlin_thr
        augmented.append(perlin_thr * blended + (1 - perlin_thr) * img)
        masks.append(perlin_thr)
    return torch.stack(augmented), torch.stack(masks)


def upsampling_loss(authors: AuthorsDsr, augmented: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One pass of ``train_upsampling_module``'s loop up to ``loss``: augmented BGR images ``(B, 3, H, W)`` and their
    masks ``(B, 1, H, W)`` → the focal loss of the upsampling module's map. Like theirs, with autograd on through the
    frozen modules (only the upsampling module is optimised). As released, ``train_dsr.py`` never reaches this loop
    (its call lacks an argument, docs/method.md#the-released-code-and-weights); the loop's body is taken as written."""
    model = authors.model_vq
    embeddings_t, embeddings = (q.detach() for q in model(augmented))
    _, recon_embeddings = authors.sub_res_hi_module(embeddings.clone(), model._vq_vae_bot)
    _, recon_embeddings_top = authors.sub_res_lo_module(embeddings_t.clone(), model._vq_vae_top)
    quant_join = torch.cat((model.upsample_t(recon_embeddings_top), recon_embeddings), dim=1)
    recon_image_recon = authors.image_recon_module(quant_join)
    recon_image = model._decoder_b(torch.cat((model.upsample_t(embeddings_t), embeddings), dim=1))
    out_mask_sm = torch.softmax(authors.anom_det_module(recon_image_recon, recon_image), dim=1)
    refined_mask_sm = torch.softmax(authors.upsample_module(recon_image_recon, recon_image, out_mask_sm), dim=1)
    return focal_loss(refined_mask_sm, mask)


def upsampling_optimizer(authors: AuthorsDsr, lr: float = LEARNING_RATE) -> torch.optim.Adam:
    """``train_upsampling_module``'s Adam. Its MultiStepLR never fires (its milestones lie at 80 % and 90 % of
    ``epochs`` while the loop runs ``epochs // 2``; docs/method.md#the-released-code-and-weights), so the LR is
    constant, as the paper has it (docs/method.md#phase-3)."""
    return torch.optim.Adam([{"params": authors.upsample_module.parameters(), "lr": lr}])
