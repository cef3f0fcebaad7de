"""`python -m peftkit ...` is `peftkit ...` (the web UI starts runs this way, with its own interpreter)."""

from .cli import console

if __name__ == "__main__":
    console()
