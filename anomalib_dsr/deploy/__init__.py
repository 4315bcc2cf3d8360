"""Deployment: the OpenVINO export rewrites and INT8 quantisation (``export.py``) and the input-checking inferencer
(``inference.py``). Imports nothing from the other sub-packages."""
