"""English text for the language-model experiment: the Debian ``fortunes`` package, byte-level.

The package installs about 2.5 MB of quotations, jokes and poems under
``/usr/share/games/fortunes/`` (``apt-get install -y fortunes``). Each fortune file (a text file
next to its ``.dat`` index) holds entries separated by lines that contain only ``%``. Entries are
read in sorted file order and split deterministically: every ``HELD_OUT_EVERY``-th entry (index
``i % 10 == 9``) is held out, the rest are for training; each entry keeps its ``%\\n`` end marker.
The tokenizer is the identity on bytes (vocabulary 256, nothing to download).

Example:
    >>> corpus = fortunes()  # doctest: +SKIP
    >>> corpus.train.dtype, int(corpus.train.max()) < 256  # doctest: +SKIP
    (torch.int64, True)
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.reproduce.datasets import DatasetUnavailableError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
INSTALL = "apt-get install -y fortunes"
HELD_OUT_EVERY = 10
VOCAB_SIZE = 256


class Corpus(NamedTuple):
    train: torch.Tensor      # 1-D int64 byte ids
    held_out: torch.Tensor   # 1-D int64 byte ids
    entries: tuple[int, int]  # (training entries, held-out entries)
    source: str


def fortune_files(root: str | Path = FORTUNES_DIR) -> list[Path]:
    """The fortune text files under ``root`` (those with a ``.dat`` index beside them), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix == "" and p.with_suffix(".dat").is_file())


def entries(text: bytes) -> list[bytes]:
    """The fortunes of one file: chunks between ``%`` lines, blank ones dropped, each ending ``%\\n``.

    Example:
        >>> entries(b"one\\n%\\ntwo\\nlines\\n%\\n")
        [b'one\\n%\\n', b'two\\nlines\\n%\\n']
    """
    out, current = [], []
    for line in text.replace(b"\r\n", b"\n").split(b"\n"):
        if line.strip() == b"%":
            chunk = b"\n".join(current).strip(b"\n")
            if chunk:
                out.append(chunk + b"\n%\n")
            current = []
        else:
            current.append(line)
    chunk = b"\n".join(current).strip(b"\n")
    if chunk:
        out.append(chunk + b"\n%\n")
    return out


def fortunes(root: str | Path = FORTUNES_DIR) -> Corpus:
    """The corpus as byte ids, split deterministically into training and held-out text.

    Raises ``DatasetUnavailableError`` naming the install command when the package is absent.
    """
    files = fortune_files(root)
    if not files:
        raise DatasetUnavailableError(
            f"no fortune files under {root}; install the Debian package: {INSTALL}")
    all_entries = [e for path in files for e in entries(path.read_bytes())]
    held = [e for i, e in enumerate(all_entries) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [e for i, e in enumerate(all_entries) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]

    def ids(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).to(torch.int64)

    return Corpus(ids(train), ids(held), (len(train), len(held)),
                  f"Debian fortunes, {len(files)} files under {root}")


def random_windows(stream: torch.Tensor, batches: int, batch_size: int, length: int,
                   seed: int) -> list[torch.Tensor]:
    """``batches`` tensors ``(batch_size, length + 1)`` cut at seeded random offsets of ``stream``.

    Example:
        >>> [tuple(b.shape) for b in random_windows(torch.arange(100), 2, 3, 8, seed=0)]
        [(3, 9), (3, 9)]
    """
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length - 1, (batches, batch_size), generator=g)
    offsets = torch.arange(length + 1)
    return [stream[s[:, None] + offsets] for s in starts]


def consecutive_windows(stream: torch.Tensor, batches: int, batch_size: int, length: int) -> list[torch.Tensor]:
    """The first ``batches * batch_size`` non-overlapping windows ``(length + 1)`` of ``stream``
    (next-token pairs inside each), in order; fewer batches when the stream is short.

    Example:
        >>> [b[:, 0].tolist() for b in consecutive_windows(torch.arange(100), 2, 2, 9)]
        [[0, 10], [20, 30]]
    """
    per = length + 1
    whole = min(batches, (len(stream) // per) // batch_size) * batch_size
    return list(stream[: whole * per].view(whole, per).split(batch_size)) if whole else []


def split_xy(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, next-token targets)`` of a ``(B, T + 1)`` window."""
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
