"""The authors' released checkpoint layout: ``original_format.py`` maps our modules' tensors to their files'
keys, ``original_checkpoint.py`` imports their six ``.pckl`` files into a Lightning checkpoint and exports back."""
