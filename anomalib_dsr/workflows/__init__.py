"""Jobs built on the model, each a command of ``anomalib-dsr``: the offline demo (``demo.py``), phase 1's general
VQ-VAE (``pretrain_vq.py``), the stage-by-stage inspection (``inspect.py``) and the benchmark against anomalib's
models (``benchmark/``)."""
