"""``python -m pyflash.bench --help``."""
from pyflash.bench.runner import main

if __name__ == "__main__":
    main()
