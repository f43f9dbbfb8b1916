"""``python -m kdcompress`` (what torchrun launches: ``torchrun --nproc_per_node 2 -m kdcompress train ...``)."""

from kdcompress.cli.app import main

if __name__ == "__main__":
    main()
