"""A benchmark model from its config entry: one evaluator for every model, the benchmark's image size, and its
backbone's ImageNet weights from a local file (:mod:`anomalib_dsr.workflows.benchmark.backbone_weights`)."""

from __future__ import annotations

import inspect

from anomalib.models import AnomalibModule

from anomalib_dsr.model.lightning_model import Dsr
from anomalib_dsr.workflows.benchmark.backbone_weights import (
    backbone_name,
    backbone_weights_file,
    check_layers,
    load_backbone_weights,
    with_backbone_normalisation,
)
from anomalib_dsr.workflows.benchmark.config import model_class


def build_model(model_config: dict, image_size: int | None) -> AnomalibModule:
    """The model with the benchmark's shared evaluator, no visualiser, the benchmark's image size, and its
    backbone's ImageNet weights from a local file when there is one (:func:`backbone_weights_file`)."""
    cls = model_class(model_config["class_path"])
    parameters = inspect.signature(cls).parameters
    kwargs = dict(model_config.get("init_args") or {})
    kwargs.update(evaluator=Dsr.configure_evaluator(), visualizer=False)
    backbone = backbone_name(model_config)
    if image_size is not None and "image_size" in parameters:
        kwargs["image_size"] = image_size
    elif "pre_processor" not in kwargs and (image_size is not None or backbone is not None):
        size = {} if image_size is None else {"image_size": (image_size, image_size)}
        pre_processor = cls.configure_pre_processor(**size)
        if backbone is not None:
            pre_processor = with_backbone_normalisation(pre_processor, backbone)
        kwargs["pre_processor"] = pre_processor
    weights = backbone_weights_file(model_config)
    if weights is not None:
        kwargs["pre_trained"] = False
    model = cls(**kwargs)
    check_layers(model, model_config)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model
