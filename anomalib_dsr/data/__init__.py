"""Data: the offline demo dataset (``demo_data.py``), real-defect datasets laid out for anomalib (``elpv.py``,
``kolektor.py``), the scan of a datamodule's files before training (``data_check.py``), image folders and the
general images of phase 1 (``image_folders.py``, ``general_images.py``). Imports nothing from the other
sub-packages."""
