"""DSR as an anomalib model: phases 2 and 3 of the paper in one ``fit`` (docs/method.md#training).

Phase 1 (the general VQ-VAE) is trained once with ``anomalib-dsr pretrain-vq`` or taken from the
authors' release; ``Dsr(vq_weights=...)`` loads it when fitting starts.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_dsr import Dsr
    >>> engine = Engine(max_steps=150_000)
    >>> engine.fit(Dsr(vq_weights="vq_model_pretrained_128_4096.pckl"), datamodule=MVTecAD(train_batch_size=8))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import AUPR, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.utils.path import get_pretrained_weights_dir
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize, Transform

from anomalib_dsr.data.data_check import check_datamodule
from anomalib_dsr.model.anomaly_generator import ImageAnomalyGenerator, perlin_masks, random_rotate
from anomalib_dsr.model.callbacks import FiniteLossGuard, FrozenModulesSetup, RngStateCheckpoint
from anomalib_dsr.model.layers.precision import check_training_precision, resolve_training_precision
from anomalib_dsr.model.loss import DsrLoss
from anomalib_dsr.model.original_format import (
    VQ_FILE_NAME,
    VQ_FORMAT,
    WeightsError,
    load_original_state,
    read_state_dict,
)
from anomalib_dsr.model.torch_model import DsrModel, check_image_size
from anomalib_dsr.model.warm_start import load_warm_start

logger = logging.getLogger(__name__)

PRETRAIN_HINT = (
    "Get the authors' released file (vq_model_pretrained_128_4096.pckl, from the DSR repository's "
    "checkpoint archive), or pretrain one on your own images with "
    "`anomalib-dsr pretrain-vq --images DIR --output vq.pckl` and pass it as `vq_weights`."
)


def default_vq_weights() -> Path:
    """Where anomalib keeps the authors' general VQ-VAE weights; never downloaded by this package."""
    return get_pretrained_weights_dir() / "dsr" / VQ_FILE_NAME


def find_normalize(transform: Transform | None) -> Normalize | None:
    """The first ``Normalize`` inside ``transform`` (searching nested ``Compose``), if any."""
    if isinstance(transform, Normalize):
        return transform
    for inner in getattr(transform, "transforms", ()):
        if (found := find_normalize(inner)) is not None:
            return found
    return None


class Dsr(AnomalibModule):
    """DSR: dual subspace re-projection network (Zavrtanik et al., ECCV 2022).

    Args:
        image_size: side(s) the default pre-processor resizes to (paper: 256x256); multiples of 32.
        vq_weights: general VQ-VAE weights in the original layout. ``None``: anomalib's pretrained
            weights directory, ``<cache>/pre_trained/dsr/vq_model_pretrained_128_4096.pckl``.
        warm_start: a warm-start file (:mod:`anomalib_dsr.model.warm_start`, ``anomalib-dsr pretrain-warm-start``):
            the restriction modules, D_spc and both U-Nets start from weights trained on general images instead of
            the paper's random initialisation (a departure); loaded with the VQ-VAE when fitting starts.
        phase_ratio: phase-2 steps per phase-3 step (paper: 2, i.e. 100,000 : 50,000).
        learning_rate: Adam learning rate of both phases (paper: 2e-4).
        lr_decay_at: share of phase 2 after which its LR is multiplied by ``lr_decay`` (paper: 0.8).
        lr_decay: paper: 0.1.
        latent_anomaly_strength: lower bound of λ (paper: 0.2).
        rotation_probability: probability of rotating a phase-2 training image (paper: 0.4).
        score_window: side of the image score's averaging window (paper: 21 at 256x256); ``None`` scales it
            with the image side, 21 at 256 and 11 at 128 (a deviation for sizes other than 256).
        channels, res_hidden, num_embeddings, embedding_dim, decoder_bottleneck, unet_width: widths
            (paper: 128, 64, 4096, 128, 64, 64); the VQ file must match the first four.
        channels_last: weights and input in the ``channels_last`` memory layout, in training too (outputs
            match the default layout to float32 rounding). Off by default: training is slower in fp32 on CPUs
            without native bf16; on GPUs it is the layout tensor cores use, not measured here (README, "Speed").
            Inference on CPU times Winograd against direct algorithms for the U-Nets' and D_spc's 3x3 convolutions
            either way.
        spc_decoder: ``"specific"``: I_spc from a D_spc learnt per category (paper); ``"general"``: from the frozen
            general decoder D_gen, no D_spc (a departure; the authors' file layout then cannot be written).
        training_precision: ``"fp32"`` (the paper's), ``"bf16"``: training steps under bf16 autocast, or ``"auto"``:
            bf16 where the device computes it natively (CPUs with AMX or AVX512-BF16, CUDA GPUs with bf16), fp32
            elsewhere, where emulated bf16 is slower; chosen when fitting starts and logged. Validation, test and
            predictions stay fp32.

    Mixed precision: ``training_precision``, or ``Engine(precision="bf16-mixed")`` (or ``Trainer``) to train and test
    under bf16 autocast; the general VQ-VAE's encoders and distances, phase 2's replacement codes and the restriction
    modules stay in fp32, so the codes are an fp32 run's; the decoders and U-Nets run in bf16 (docs/speed.md has its
    speed and accuracy).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = (256, 256),
        vq_weights: str | Path | None = None,
        warm_start: str | Path | None = None,
        phase_ratio: float = 2.0,
        learning_rate: float = 2e-4,
        lr_decay_at: float = 0.8,
        lr_decay: float = 0.1,
        latent_anomaly_strength: float = 0.2,
        rotation_probability: float = 0.4,
        score_window: int | None = None,
        channels: int = 128,
        res_hidden: int = 64,
        num_embeddings: int = 4096,
        embedding_dim: int = 128,
        decoder_bottleneck: int = 64,
        unet_width: int = 64,
        channels_last: bool = False,
        spc_decoder: str = "specific",
        training_precision: str = "fp32",
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        check_image_size(*size)
        super().__init__(
            pre_processor=self.configure_pre_processor(size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if phase_ratio <= 0:
            msg = f"phase_ratio must be positive (phase-2 steps per phase-3 step), got {phase_ratio}."
            raise ValueError(msg)
        self.check_transform(self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None)
        check_training_precision(training_precision)
        self.training_precision = training_precision
        self.train_dtype = torch.float32  # fixed when fitting starts (``training_precision``)
        self.vq_weights = vq_weights
        self.warm_start = warm_start
        self.phase_ratio = phase_ratio
        self.learning_rate = learning_rate
        self.lr_decay_at = lr_decay_at
        self.lr_decay = lr_decay
        self.rotation_probability = rotation_probability
        self.model = DsrModel(
            channels,
            res_hidden,
            num_embeddings,
            embedding_dim,
            decoder_bottleneck,
            unet_width,
            latent_anomaly_strength,
            score_window,
            channels_last,
            spc_decoder,
        )
        self.loss = DsrLoss()
        self.image_anomalies = ImageAnomalyGenerator()
        self.phase2_steps: int | None = None  # fixed when fitting starts, kept in checkpoints

    @staticmethod
    def check_transform(transform: Transform | None) -> None:
        """Refuse mean/std normalisation: DSR's VQ-VAE expects pixels in [0, 1] (docs/method.md#input)."""
        if (normalize := find_normalize(transform)) is not None:
            msg = (
                f"DSR takes images in [0, 1] without mean/std normalisation, but the transform contains {normalize}. "
                "Remove Normalize from the pre-processor and the datamodule's augmentations."
            )
            raise ValueError(msg)

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Before fitting: check the transforms, then scan the dataset's files (``data_check``), so that a
        broken file stops the run in seconds with its name, not hours later in a data loader."""
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("train_augmentations", "augmentations"):
            self.check_transform(getattr(datamodule, name, None))
        if datamodule is not None:
            transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
            check_datamodule(datamodule, transform, check_image_size)

    def on_fit_start(self) -> None:
        """Unless resuming, load the general VQ-VAE and the warm start, if any. Not in ``setup``: Lightning sets
        ``trainer.ckpt_path`` for this run only after ``setup`` (there it still holds the previous run's path)."""
        super().on_fit_start()
        if self.trainer.ckpt_path is None:
            self.load_vq_weights()
            if self.warm_start is not None:
                load_warm_start(self.model, self.warm_start)
                logger.info("Warm start of phases 2 and 3 from %s", self.warm_start)
        chosen = resolve_training_precision(self.training_precision, self.device.type)
        self.train_dtype = torch.bfloat16 if chosen == "bf16" else torch.float32
        logger.info("DSR trains in %s (training_precision=%r on %s).", chosen, self.training_precision, self.device)

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's (pre- and post-processor, evaluator, visualizer), then the non-finite loss guard, the random
        state in checkpoints (simulated anomalies and the data order draw from it), and the set-up for training one
        phase's modules while the general VQ-VAE stays frozen."""
        own = [FiniteLossGuard(), RngStateCheckpoint("dsr_rng_states"), FrozenModulesSetup("model.vq")]
        return [*super().configure_callbacks(), *own]

    def on_train_start(self) -> None:
        """With several processes (DDP), give each rank its own random stream, so that ranks simulate
        different anomalies: Lightning seeds every rank alike, and a resumed run restores rank 0's state
        everywhere. The per-rank seed is drawn from that common state, so runs stay reproducible."""
        if self.trainer.world_size > 1:
            base = int(torch.randint(2**62, (), dtype=torch.int64))  # the same on every rank
            torch.manual_seed(base + self.trainer.global_rank)

    def load_vq_weights(self) -> None:
        """Load ``vq_weights`` (original layout, ``weights_only=True``) into the frozen VQ-VAE."""
        path = Path(self.vq_weights) if self.vq_weights is not None else default_vq_weights()
        if not path.is_file():
            msg = f"DSR needs general VQ-VAE weights, but {path} does not exist. {PRETRAIN_HINT}"
            raise FileNotFoundError(msg)
        load_original_state(self.model.vq, read_state_dict(path), VQ_FORMAT, path)
        logger.info("Loaded general VQ-VAE weights from %s", path)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam with two parameter groups: phase-2 modules (LR x0.1 after 80 % of phase 2) and the
        upsampling module (constant LR). Phases switch by optimisation step."""
        if self.phase2_steps is None:
            total = int(self.trainer.estimated_stepping_batches)
            if total < 2:
                msg = f"DSR needs at least 2 training steps (one per phase), the trainer allows {total}."
                raise ValueError(msg)
            self.phase2_steps = min(max(round(total * self.phase_ratio / (self.phase_ratio + 1)), 1), total - 1)
            logger.info(
                "DSR schedule: %d phase-2 steps, then %d phase-3 steps.", self.phase2_steps, total - self.phase2_steps
            )
        model = self.model
        phase2 = [model.restriction_lo, model.restriction_hi, model.object_decoder, model.anomaly_detection]
        phase2 = [module for module in phase2 if module is not None]  # no D_spc with spc_decoder="general"
        # The fused Adam kernel (CPU and CUDA): the same update, several times faster than the per-tensor loop.
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam(
            [
                {"params": [p for module in phase2 for p in module.parameters()]},
                {"params": list(model.upsampling.parameters())},
            ],
            lr=self.learning_rate,
            fused=fused or None,
        )
        decay_step = int(self.lr_decay_at * self.phase2_steps)
        decay = self.lr_decay
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda step: 1.0 if step < decay_step else decay, lambda _step: 1.0]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dsr_phase2_steps"] = self.phase2_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "dsr_phase2_steps" not in checkpoint:
            msg = (
                "This Lightning checkpoint was not written by anomalib_dsr.Dsr "
                f"(hyper-parameters: {sorted(checkpoint.get('hyper_parameters', {}))})."
            )
            raise WeightsError(msg)
        super().on_load_checkpoint(checkpoint)
        self.phase2_steps = checkpoint["dsr_phase2_steps"]

    # -------------------------------------------------------------------------------------------- training
    @property
    def phase(self) -> int:
        """2 (restriction, D_spc, anomaly detection) or 3 (upsampling), from the optimisation step."""
        return 2 if self.phase2_steps is None or self.global_step < self.phase2_steps else 3

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of the current phase on a batch of normal RGB images ``(B, 3, H, W)`` in [0, 1]."""
        del args, kwargs
        images = batch.image
        phase = self.phase
        bf16 = self.train_dtype == torch.bfloat16
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            if phase == 2:
                images = random_rotate(images, self.rotation_probability)
                batch_size, _, height, width = images.shape
                masks = perlin_masks(batch_size, height, width, images.device).to(images.dtype)
                terms = self.loss.restriction(self.model.forward_restriction_training(images, masks))
                self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, on_step=True, on_epoch=False)
                loss = terms["loss"]
            else:
                images, masks = self.image_anomalies(images)
                loss = self.loss.upsampling(self.model.forward_upsampling_training(images), masks)
        self.log("train/phase", float(phase), on_step=True, on_epoch=False)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict ``pred_score`` and ``anomaly_map`` for a validation batch."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    @torch.no_grad()
    def curve_predictions(self, images: torch.Tensor) -> InferenceBatch:
        """What a learning curve (:mod:`anomalib_dsr.evaluation.learning_curve`) scores: the model's outputs, except
        that until the upsampling module has trained a step the anomaly map is P_lo's anomaly channel ``(B, H, W)``."""
        if self.phase2_steps is None or self.global_step > self.phase2_steps:
            return self.model(images)
        _, _, probs_lo = self.model.detect(images)
        return InferenceBatch(pred_score=self.model.image_score(probs_lo), anomaly_map=probs_lo[:, 1])

    # -------------------------------------------------------------------------------------- anomalib hooks
    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: the VQ-VAE is loaded when fitting starts, and a random model's scores are noise."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (paper: 256x256); no mean/std normalisation (docs/method.md#input)."""
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True)]))

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC and F1; pixel AUROC and pixel AP (``pixel_AUPR``, the paper's localisation metric)."""
        metrics: Sequence = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(test_metrics=list(metrics))

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: Any = None,
        datamodule: Any = None,
        metric: Any = None,
        task: Any = None,
        max_drop: float = 0.01,
        ov_kwargs: dict[str, Any] | None = None,
        onnx_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """anomalib's OpenVINO export, then the code path kept in f32 at any inference precision
        (:func:`anomalib_dsr.deploy.export.keep_code_path_in_f32`): OpenVINO computes in bf16 by default on CPUs with
        AMX or AVX512-BF16, where the codes would otherwise change. ``FP16`` stores the other weights in f16."""
        from anomalib.deploy import CompressionType

        from anomalib_dsr.deploy.export import keep_code_path_in_f32

        fp16 = compression_type == CompressionType.FP16
        xml = super().to_openvino(
            export_root, model_file_name, input_size, None if fp16 else compression_type, datamodule, metric, task,
            max_drop, ov_kwargs, onnx_kwargs,
        )  # fmt: skip
        keep_code_path_in_f32(xml, compress_to_fp16=fp16)
        return xml

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:
        """``compression_type=INT8_PTQ``: NNCF calibrated on the normal training images, the code path unquantised
        (:func:`anomalib_dsr.deploy.export.quantize`)."""
        from anomalib_dsr.deploy.export import quantize

        return quantize(model, datamodule)
