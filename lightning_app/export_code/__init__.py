"""Code that ``robucap export`` copies into every export directory, for ``trust_remote_code=True`` loading.

Each module here must import nothing from robucap: it runs inside a user's transformers process, from the export
directory, with robucap not installed. ``datamodules/image_processing_robucap.py`` (with ``image_decode.py``) is
the third such module; transformers copies it itself when the processor is saved.
"""
