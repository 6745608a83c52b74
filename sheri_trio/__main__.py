"""``python -m sheri_trio``: the ``sheri`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
