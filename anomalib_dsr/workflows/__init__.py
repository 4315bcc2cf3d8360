"""Jobs built on the model: the offline demo (``demo.py``, ``demo_data.py``), the benchmark against anomalib's
models (``benchmark.py``, ``learning_curve.py``), dataset preparation (``elpv.py``) and the paper's evaluation
protocol and tables (``paper_protocol.py``, ``paper_table.py``)."""
