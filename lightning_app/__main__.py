"""``python -m lightning_app`` is the ``robucap`` command."""

from lightning_app.cli import console_main

if __name__ == "__main__":
    console_main()
