"""``python -m splitzip_vllm``: same as the ``splitzip-vllm`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
