"""Evaluation: the paper's protocol and tables (``paper_protocol.py``, ``paper_table.py``) and learning curves
(``learning_curve.py``)."""
