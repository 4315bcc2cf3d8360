"""Training faithfulness (issue #25): our phase-2 and phase-3 training steps against the authors'
(``authors_training_reference.py``, written from their ``train_dsr.py``), in float64, from the same weights, batches
and random draws, at tiny widths.

Ours is the production path: ``Dsr.training_step``, backward, then the optimiser and scheduler of
``Dsr.configure_optimizers``, as Lightning's automatic optimisation runs them. Its draws are injected at three seams,
in this file only: ``random_rotate`` and ``perlin_masks`` where the steps call them (the rotation hands the image back
unrotated and records its probability: the authors rotate with imgaug, which is not re-implemented, so the batch is
taken as already rotated on both sides), and ``torch.rand`` inside ``anomaly_generator`` (:class:`ScriptedRand`), which
hands out the authors' draws translated to ours.

Tolerances, all absolute, in float64: losses 1e-8; every gradient entry 1e-8 times the largest gradient entry of its
step (the conv biases ahead of an InstanceNorm have gradients that are zero but for rounding, where relative errors
mean nothing); every weight 1e-8 after each Adam step. Found: losses within 3e-13, gradients within 2e-11 (largest
entries 0.3 to 4), weights within 1.3e-9, the largest on those biases, whose 1e-14 rounding noise Adam's normalised
step magnifies (the other weights within 2e-10).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from anomalib_dsr import Dsr, DsrModel
from anomalib_dsr.model import anomaly_generator, lightning_model
from anomalib_dsr.model.anomaly_generator import perlin_masks
from anomalib_dsr.model.original_format import ALL_FORMATS, MODULE_FORMATS, FileFormat, original_state
from anomalib_dsr.model.torch_model import RestrictionTrainingOutput

from authors_reference import AuthorsDsr
from authors_training_reference import (
    LEARNING_RATE,
    ImageDraws,
    LatentDraws,
    image_anomalies,
    restriction_losses,
    restriction_optimizer,
    upsampling_loss,
    upsampling_optimizer,
)

SIZE = 64
BATCH = 4
STEPS = 3
# Both sides in float64 (eps 2.2e-16) with different kernels: another CPU's summation order changes the differences
# found (module docstring) only within float64 rounding, and 1e-8 stays 8x above the largest (1.3e-9, Adam's step on
# the rounding noise of gradients that are zero); a draw used otherwise moves the loss by more than CHANGED.
TOLERANCE = 1e-8
CHANGED = 1e-6  # how far a changed draw must move the loss: 100 times the tolerance
PAPER_PHASE2_STEPS = 100_000
PHASE2_FORMATS = MODULE_FORMATS[:4]  # restriction hi and lo, D_spc, anomaly detection
PHASE3_FORMATS = MODULE_FORMATS[4:]  # upsampling
# Per step, the level choice of each image; the last image of each batch is normal (empty mask).
STEP_LEVELS = (("both", "lo", "hi", "both"), ("hi", "both", "lo", "lo"), ("lo", "hi", "both", "hi"))
# The authors' (use_both, use_lo) per level choice, and the uniform that makes LatentAnomalyGenerator.sample_levels
# take it: [0, 0.5) both, [0.5, 0.75) lo only, [0.75, 1) hi only.
AUTHORS_LEVELS = {"both": (1, 1), "lo": (0, 1), "hi": (0, 0)}
OUR_LEVEL_DRAW = {"both": 0.25, "lo": 0.625, "hi": 0.875}
STEP_NORMAL = ((False, False, True, False), (True, False, False, False), (False, True, False, False))  # phase 3


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    """Everything in float64, including the draws our step takes with ``torch.rand``'s default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ------------------------------------------------------------------------------------------------ the two sides
def smooth_images(n: int) -> torch.Tensor:
    """``(n, 3, SIZE, SIZE)`` in [0, 1]: bilinear enlargements of 8x8 noise (the global RNG)."""
    return F.interpolate(torch.rand(n, 3, 8, 8), size=(SIZE, SIZE), mode="bilinear", align_corners=False)


@torch.no_grad()
def spread_codebooks(model: DsrModel, images: torch.Tensor) -> None:
    """Codes drawn among the features of ``images`` (plus noise), lo first, as hi depends on it: a random encoder's
    features are small next to N(0, 1) codes and would all take one or two of them."""
    for level in ("lo", "hi"):
        encoded = model.vq.encode(model.vq_input(images))
        z = encoded.z_lo if level == "lo" else encoded.z_hi
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = getattr(model.vq, f"codebook_{level}")
        picks = flat[torch.randperm(flat.shape[0])[: codebook.num_embeddings]]
        codebook.embedding.weight.copy_(picks + 0.1 * picks.std() * torch.randn_like(picks))


def anomaly_masks(n: int) -> torch.Tensor:
    """``n`` Perlin masks ``(n, 1, SIZE, SIZE)`` of our generator, each redrawn until it is not empty."""
    masks = []
    while len(masks) < n:
        mask = perlin_masks(1, SIZE, SIZE, torch.device("cpu"), normal_probability=0.0)
        if mask.any():
            masks.append(mask)
    return torch.cat(masks).double()


def make_pair(widths: dict[str, int], phase: int) -> tuple[Dsr, AuthorsDsr]:
    """Our tiny ``Dsr`` in training mode at the start of ``phase``, and the authors' modules with its weights."""
    torch.manual_seed(0)
    dsr = Dsr(image_size=SIZE, visualizer=False, **widths)
    dsr.model.double()
    spread_codebooks(dsr.model, smooth_images(8))
    dsr.phase2_steps = PAPER_PHASE2_STEPS if phase == 2 else 0
    dsr.train()
    authors = AuthorsDsr(**widths).double()
    authors.load_files({f.file_name: original_state(getattr(dsr.model, f.attribute), f) for f in ALL_FORMATS})
    return dsr, authors


def our_optimiser(dsr: Dsr) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    config = dsr.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


# ------------------------------------------------------------------------------------------------------- draws
def phase2_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, LatentDraws]:
    """RGB images ``(B, 3, H, W)``, masks ``(B, 1, H, W)`` and the authors' latent draws of a phase-2 step."""
    torch.manual_seed(100 + step)
    images = smooth_images(BATCH)
    masks = anomaly_masks(BATCH)
    masks[-1] = 0
    levels = torch.tensor([AUTHORS_LEVELS[level] for level in STEP_LEVELS[step]])
    draws = LatentDraws(
        strength_lo=torch.rand(BATCH),
        strength_hi=torch.rand(BATCH),
        ranks_lo=torch.rand(BATCH, SIZE // 8, SIZE // 8),
        ranks_hi=torch.rand(BATCH, SIZE // 4, SIZE // 4),
        use_both=levels[:, 0],
        use_lo=levels[:, 1],
    )
    return images, masks, draws


def our_latent_draws(masks: torch.Tensor, draws: LatentDraws) -> list[torch.Tensor]:
    """What ``torch.rand`` must return, in our step's order, to take the authors' ``draws``: the level choice
    ``(B,)``; then per level (lo, then hi) with any cell to replace, λ's uniforms ``(B,)`` and the rank uniforms of
    those cells, in ``nonzero`` order (``LatentAnomalyGenerator.replace`` draws for those cells only)."""
    both, lo_only = draws.use_both.bool(), ~draws.use_both.bool() & draws.use_lo.bool()
    not_both = torch.where(lo_only, OUR_LEVEL_DRAW["lo"], OUR_LEVEL_DRAW["hi"])
    level_draw = torch.where(both, OUR_LEVEL_DRAW["both"], not_both)
    out = [level_draw]
    levels = (
        (8, both | lo_only, draws.strength_lo, draws.ranks_lo),
        (4, both | ~lo_only, draws.strength_hi, draws.ranks_hi),
    )
    for cell, on, strength, ranks in levels:
        cells = F.max_pool2d(masks, cell)[:, 0].bool() & on.view(-1, 1, 1)
        if cells.any():
            out += [strength, ranks[cells.nonzero(as_tuple=True)]]
    return out


def phase3_batch(step: int) -> tuple[torch.Tensor, ImageDraws]:
    """RGB images ``(B, 3, H, W)`` and the draws of a phase-3 step, colours in RGB (ours)."""
    torch.manual_seed(200 + step)
    images = smooth_images(BATCH)
    draws = ImageDraws(anomaly_masks(BATCH), torch.rand(BATCH, 3), torch.rand(BATCH), torch.tensor(STEP_NORMAL[step]))
    return images, draws


def authors_image_draws(draws: ImageDraws) -> ImageDraws:
    """The authors draw the colour in their images' BGR order."""
    return replace(draws, colour=draws.colour.flip(1))


class ScriptedRand:
    """Stands in for the ``torch`` module inside :mod:`anomaly_generator`: ``rand`` hands out ``draws`` in order,
    each checked against the shape asked for; every other attribute is torch's."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = list(draws)

    def rand(self, *size, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        assert self.draws, f"an unexpected draw of shape {shape}"
        draw = self.draws.pop(0)
        assert tuple(draw.shape) == tuple(shape), f"expected a draw of shape {tuple(draw.shape)}, asked for {shape}"
        return draw.to(device=device, dtype=dtype or torch.get_default_dtype())

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


@contextmanager
def injected(monkeypatch: pytest.MonkeyPatch, masks: torch.Tensor, draws: list[torch.Tensor]) -> Iterator[list[float]]:
    """Our steps take ``masks`` ``(B, 1, H, W)`` from ``perlin_masks``, ``draws`` from ``torch.rand`` and the images
    unrotated; yields the probabilities ``random_rotate`` was called with. Every draw must be taken."""
    rotations: list[float] = []

    def rotate(images: torch.Tensor, probability: float) -> torch.Tensor:
        rotations.append(probability)
        return images

    def given_masks(
        batch: int, height: int, width: int, device: torch.device, normal_probability: float = 0.5
    ) -> torch.Tensor:
        assert (batch, 1, height, width) == masks.shape and normal_probability == 0.5
        return masks

    scripted = ScriptedRand(draws)
    with monkeypatch.context() as patch:
        for module in (lightning_model, anomaly_generator):
            patch.setattr(module, "random_rotate", rotate)
            patch.setattr(module, "perlin_masks", given_masks)
        patch.setattr(anomaly_generator, "torch", scripted)
        yield rotations
    assert not scripted.draws, f"{len(scripted.draws)} draws not taken"


# ------------------------------------------------------------------------------------------------- comparisons
def our_gradients(dsr: Dsr, formats: tuple[FileFormat, ...]) -> dict[str, torch.Tensor]:
    """``file name:original key`` → gradient of our trained modules; no other parameter may have one."""
    trained = {f.attribute for f in formats}
    others = [n for n, p in dsr.model.named_parameters() if p.grad is not None and n.split(".")[0] not in trained]
    assert not others, f"parameters outside the phase's modules got gradients: {others}"
    return {
        f"{f.file_name}:{f.to_original(name)}": p.grad.clone()
        for f in formats
        for name, p in getattr(dsr.model, f.attribute).named_parameters()
        if p.grad is not None
    }


def authors_gradients(authors: AuthorsDsr, formats: tuple[FileFormat, ...]) -> dict[str, torch.Tensor]:
    return {
        f"{f.file_name}:{name}": p.grad.clone()
        for f in formats
        for name, p in getattr(authors, AuthorsDsr.FILES[f.file_name]).named_parameters()
        if p.grad is not None
    }


def assert_same_gradients(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], step: int) -> None:
    """The same parameters have gradients, every entry within ``TOLERANCE`` times the step's largest (non-zero)."""
    assert ours.keys() == theirs.keys()
    scale = max(g.abs().max().item() for g in theirs.values())
    assert scale > 0
    worst = {key: (ours[key] - theirs[key]).abs().max().item() for key in theirs}
    key = max(worst, key=worst.get)
    message = f"step {step}: {key} differs by {worst[key]:.3g} (largest gradient {scale:.3g})"
    assert worst[key] <= TOLERANCE * scale, message


def assert_same_weights(dsr: Dsr, authors: AuthorsDsr, step: int) -> None:
    """All six files' tensors, the frozen modules' included, within ``TOLERANCE``."""
    for f in ALL_FORMATS:
        ours = original_state(getattr(dsr.model, f.attribute), f)
        theirs = getattr(authors, AuthorsDsr.FILES[f.file_name]).state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            difference = (ours[key] - value).abs().max().item()
            assert difference <= TOLERANCE, f"after step {step}: {f.file_name}:{key} differs by {difference:.3g}"


def assert_paper_adam(*groups: dict) -> None:
    """Adam parameter groups with the paper's settings: LR 2e-4, default betas and eps, no weight decay."""
    for group in groups:
        settings = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
        assert settings == (LEARNING_RATE, (0.9, 0.999), 1e-8, 0)


def run_our_step(
    dsr: Dsr,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, torch.Tensor]:
    """Lightning's automatic optimisation of one batch; returns the loss terms (phase 2) or ``{"loss": ...}``."""
    terms: dict[str, torch.Tensor] = {}
    restriction = dsr.loss.restriction

    def recording(out: RestrictionTrainingOutput) -> dict[str, torch.Tensor]:
        terms.update(restriction(out))
        return terms

    optimiser.zero_grad()
    with monkeypatch.context() as patch:
        patch.setattr(dsr.loss, "restriction", recording)
        loss = dsr.training_step(SimpleNamespace(image=images))["loss"]
    loss.backward()
    optimiser.step()
    scheduler.step()
    return terms or {"loss": loss}


# ------------------------------------------------------------------------------------------------------- tests
def test_phase2_steps_match_the_authors(tiny_widths: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three phase-2 steps: the same loss terms, gradients and weights as the authors' ``train_on_device``."""
    dsr, authors = make_pair(tiny_widths, phase=2)
    ours_opt, scheduler = our_optimiser(dsr)
    theirs_opt = restriction_optimizer(authors)
    assert_paper_adam(*ours_opt.param_groups, *theirs_opt.param_groups)
    for step in range(STEPS):
        images, masks, draws = phase2_batch(step)
        with injected(monkeypatch, masks, our_latent_draws(masks, draws)) as rotations:
            ours = run_our_step(dsr, ours_opt, scheduler, images, monkeypatch)
        assert rotations == [0.4]  # TrainWholeImageDataset: rotate if torch.rand(1) > 0.6
        ours_grads = our_gradients(dsr, PHASE2_FORMATS)

        theirs_opt.zero_grad()
        theirs = restriction_losses(authors, images.flip(1), masks, draws)
        theirs["loss"].backward()
        theirs_grads = authors_gradients(authors, PHASE2_FORMATS)
        theirs_opt.step()

        assert ours.keys() == theirs.keys()
        for term, value in theirs.items():
            assert abs(ours[term].item() - value.item()) <= TOLERANCE, (step, term, ours[term].item(), value.item())
        assert_same_gradients(ours_grads, theirs_grads, step)
        assert_same_weights(dsr, authors, step)


def test_phase3_steps_match_the_authors(tiny_widths: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three phase-3 steps: the same loss, gradients and weights as the authors' ``train_upsampling_module``."""
    dsr, authors = make_pair(tiny_widths, phase=3)
    ours_opt, scheduler = our_optimiser(dsr)
    theirs_opt = upsampling_optimizer(authors)
    assert_paper_adam(ours_opt.param_groups[1], *theirs_opt.param_groups)  # group 0: phase 2's, idle here
    for step in range(STEPS):
        images, draws = phase3_batch(step)
        masks = draws.perlin * ~draws.normal.view(-1, 1, 1, 1)
        our_draws = [draws.colour.view(BATCH, 3, 1, 1), draws.beta.view(BATCH, 1, 1, 1)]
        with injected(monkeypatch, masks, our_draws) as rotations:
            ours = run_our_step(dsr, ours_opt, scheduler, images, monkeypatch)["loss"]
        assert rotations == [0.3]  # MVTecImageAnomTrainDataset: rotate if torch.rand(1) > 0.7
        ours_grads = our_gradients(dsr, PHASE3_FORMATS)

        theirs_opt.zero_grad()
        augmented, their_masks = image_anomalies(images.flip(1), authors_image_draws(draws))
        theirs = upsampling_loss(authors, augmented, their_masks)
        theirs.backward()
        theirs_grads = authors_gradients(authors, PHASE3_FORMATS)
        theirs_opt.step()

        assert torch.equal(their_masks, masks)  # exact: the same 0/1 Perlin masks, zeroed or kept whole
        assert abs(ours.item() - theirs.item()) <= TOLERANCE, (step, ours.item(), theirs.item())
        assert_same_gradients(ours_grads, theirs_grads, step)
        assert_same_weights(dsr, authors, step)


def changed_phase2_draws(masks: torch.Tensor, draws: LatentDraws, change: str) -> tuple[torch.Tensor, LatentDraws]:
    """Step 0's masks and draws with one thing changed (images: both, lo, hi, normal)."""
    masks, draws = masks.clone(), replace(draws)
    if change == "rank":  # the first replaced lo cell of image 0 takes another code of its window
        cell = F.max_pool2d(masks[:1], 8)[0, 0].flatten().nonzero()[0, 0]
        draws.ranks_lo = draws.ranks_lo.clone()
        draws.ranks_lo[0].view(-1)[cell] = (draws.ranks_lo[0].view(-1)[cell] + 0.5) % 1
    elif change == "strength":  # image 2's λ_hi
        draws.strength_hi = draws.strength_hi.clone()
        draws.strength_hi[2] = (draws.strength_hi[2] + 0.5) % 1
    elif change == "level":  # image 1: hi only instead of lo only
        draws.use_lo = draws.use_lo.clone()
        draws.use_lo[1] = 0
    elif change == "mask":  # image 0 normal
        masks[0] = 0
    return masks, draws


@pytest.mark.parametrize("change", ["rank", "strength", "level", "mask"])
def test_a_changed_phase2_draw_changes_the_loss(
    tiny_widths: dict[str, int], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The comparison is not vacuous: the authors' loss with one draw changed is more than ``CHANGED`` from ours,
    with the draws unchanged within ``TOLERANCE``."""
    dsr, authors = make_pair(tiny_widths, phase=2)
    images, masks, draws = phase2_batch(0)
    with torch.no_grad():
        with injected(monkeypatch, masks, our_latent_draws(masks, draws)):
            ours = dsr.training_step(SimpleNamespace(image=images))["loss"].item()
        same = restriction_losses(authors, images.flip(1), masks, draws)["loss"].item()
        changed_masks, changed_draws = changed_phase2_draws(masks, draws, change)
        changed = restriction_losses(authors, images.flip(1), changed_masks, changed_draws)["loss"].item()
    assert abs(same - ours) <= TOLERANCE
    assert abs(changed - ours) > CHANGED, (change, changed, ours)


@pytest.mark.parametrize("change", ["colour", "beta", "normal"])
def test_a_changed_phase3_draw_changes_the_loss(
    tiny_widths: dict[str, int], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """As for phase 2, changing one draw of image 0 (anomalous)."""
    dsr, authors = make_pair(tiny_widths, phase=3)
    images, draws = phase3_batch(0)
    masks = draws.perlin * ~draws.normal.view(-1, 1, 1, 1)
    with torch.no_grad():
        with injected(monkeypatch, masks, [draws.colour.view(BATCH, 3, 1, 1), draws.beta.view(BATCH, 1, 1, 1)]):
            ours = dsr.training_step(SimpleNamespace(image=images))["loss"].item()
        theirs = authors_image_draws(draws)
        same = upsampling_loss(authors, *image_anomalies(images.flip(1), theirs)).item()
        changed_values = {
            "colour": {"colour": theirs.colour.clone().index_fill_(0, torch.tensor([0]), 0.5)},
            "beta": {"beta": theirs.beta.clone().index_fill_(0, torch.tensor([0]), 0.05)},
            "normal": {"normal": theirs.normal.clone().index_fill_(0, torch.tensor([0]), True)},
        }[change]
        changed = upsampling_loss(authors, *image_anomalies(images.flip(1), replace(theirs, **changed_values))).item()
    assert abs(same - ours) <= TOLERANCE
    assert abs(changed - ours) > CHANGED, (change, changed, ours)
