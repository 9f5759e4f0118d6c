"""``python tests/count_decodes.py LOG_PREFIX TRAIN_ARGS...``: ``python -m jaxft.train``, with every
image decode of this process appended to ``LOG_PREFIX.<process index>`` (one relative path per
line). tests/test_distributed.py counts them: each process of a multi-host job must decode
only its own rows of every batch. Decoding happens in this process (run it with --workers 0)."""

from __future__ import annotations

import sys


def main() -> int:
    prefix, args = sys.argv[1], sys.argv[2:]
    from jaxft.data import folder
    from jaxft.train import main as train_main

    decode = folder.load_rgb
    lines: list[str] = []

    def counted(path):
        lines.append(str(path))
        return decode(path)

    folder.load_rgb = counted
    try:
        return train_main(args)
    finally:
        import jax

        with open(f"{prefix}.{jax.process_index()}", "w") as log:
            log.write("".join(f"{line}\n" for line in lines))


if __name__ == "__main__":
    sys.exit(main())
