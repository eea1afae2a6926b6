"""Training data with no download: Python's standard library sources as byte-level text.

Each .py file under sysconfig.get_paths()["stdlib"] is one document, tokenized as its bytes (0..255)
between the tiny preset's bos (256) and eos (257). The split is by file and fixed: a file is in the
validation set when the crc32 of its path relative to the stdlib root is 0 mod VALIDATION_EVERY, so
it never changes between runs, machines or processes.
"""
import sysconfig
import zlib
from pathlib import Path
from typing import List, Optional

import torch

BOS, EOS = 256, 257
VALIDATION_EVERY = 20  # about 5% of the files


def stdlib_files(split: str, max_files: Optional[int] = None) -> List[Path]:
    """The split's ("train" or "validation") .py files of the standard library, sorted by path."""
    if split not in ("train", "validation"):
        raise ValueError(f"argument 'split': expected 'train' or 'validation', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative.split("/"):
            continue
        if (zlib.crc32(relative.encode()) % VALIDATION_EVERY == 0) == (split == "validation"):
            files.append(path)
            if max_files is not None and len(files) == max_files:
                break
    return files


def load_tokens(split: str, max_files: Optional[int] = None) -> torch.Tensor:
    """One int16 stream [num_tokens] (int64 costs 4x the memory for ~30 MB): bos, bytes, eos of each file."""
    chunks = []
    for path in stdlib_files(split, max_files):
        raw = path.read_bytes()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        chunks += [torch.tensor([BOS], dtype=torch.int16), data.to(torch.int16), torch.tensor([EOS], dtype=torch.int16)]
    if not chunks:
        raise ValueError(f"no standard library sources found for the {split!r} split")
    return torch.cat(chunks)


class Batches:
    """Random windows of seq_len + 2 tokens (inputs, next-token and MTP targets), the same global
    batch for a given seed and step whatever the number of processes; rank r of world w takes rows
    [r * B / w, (r + 1) * B / w)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {seq_len + 2}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def global_batch(self, step: int) -> torch.Tensor:
        """[B, seq_len + 2] int64."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=generator)
        return torch.stack([self.tokens[s:s + self.seq_len + 2] for s in starts.tolist()]).long()

    def local_batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if self.batch_size % world_size:
            raise ValueError(f"batch size {self.batch_size} is not a multiple of the world size {world_size}")
        rows = self.batch_size // world_size
        return self.global_batch(step)[rank * rows:(rank + 1) * rows]
