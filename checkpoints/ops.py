"""Tensor transforms used by the mapping tables: PyTorch layout (source) <-> our layout (destination).

Every op maps a list of source tensors to a list of destination tensors (`forward`), back (`inverse`), and
does the same on shapes alone (`shapes`, `inverse_shapes`) so a whole checkpoint can be checked from its
headers before any data is read. Shape functions raise ValueError with a short reason on a mismatch.
All ops except the LoRA ones only move bytes (transpose, permute, reshape, split, concatenate), so a
conversion followed by an export is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


class NotInvertible(Exception):
    """The op has no inverse in this direction (e.g. a LoRA merge cannot be split back into A and B)."""


@dataclass(frozen=True)
class Op:
    """Identity: one tensor, unchanged."""

    name = "copy"

    def shapes(self, src: list[Shape]) -> list[Shape]:
        return [tuple(src[0])]

    def inverse_shapes(self, dst: list[Shape]) -> list[Shape]:
        return [tuple(dst[0])]

    def forward(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        return [xs[0]]

    def inverse(self, ys: list[np.ndarray]) -> list[np.ndarray]:
        return [ys[0]]


COPY = Op()


@dataclass(frozen=True)
class Transpose(Op):
    """Linear weight (out, in) <-> kernel (in, out)."""

    name = "transpose"

    def shapes(self, src):
        if len(src[0]) != 2:
            raise ValueError(f"expected a 2-D Linear weight (out, in), got shape {tuple(src[0])}")
        return [tuple(src[0])[::-1]]

    def inverse_shapes(self, dst):
        return [tuple(dst[0])[::-1]]

    def forward(self, xs):
        return [xs[0].T]

    def inverse(self, ys):
        return [ys[0].T]


T = Transpose()


@dataclass(frozen=True)
class Permute(Op):
    """Axis permutation, e.g. Conv3d weight (O, I, T, H, W) -> Flax (T, H, W, I, O) with perm (2, 3, 4, 1, 0)."""

    perm: tuple[int, ...] = ()
    name = "permute"

    def shapes(self, src):
        if len(src[0]) != len(self.perm):
            raise ValueError(f"expected a {len(self.perm)}-D tensor, got shape {tuple(src[0])}")
        return [tuple(src[0][p] for p in self.perm)]

    def inverse_shapes(self, dst):
        inv = np.argsort(self.perm)
        return [tuple(dst[0][p] for p in inv)]

    def forward(self, xs):
        return [np.transpose(xs[0], self.perm)]

    def inverse(self, ys):
        return [np.transpose(ys[0], np.argsort(self.perm))]


CONV3D = Permute((2, 3, 4, 1, 0))


@dataclass(frozen=True)
class Squeeze(Op):
    """Drop `lead` leading unit axes: task tokens (1, 1, D) -> (D,)."""

    lead: int = 1
    name = "squeeze"

    def shapes(self, src):
        s = tuple(src[0])
        if len(s) < self.lead or any(d != 1 for d in s[: self.lead]):
            raise ValueError(f"expected {self.lead} leading unit axes, got shape {s}")
        return [s[self.lead:]]

    def inverse_shapes(self, dst):
        return [(1,) * self.lead + tuple(dst[0])]

    def forward(self, xs):
        return [xs[0].reshape(xs[0].shape[self.lead:])]

    def inverse(self, ys):
        return [ys[0].reshape((1,) * self.lead + ys[0].shape)]


SQUEEZE2 = Squeeze(2)


@dataclass(frozen=True)
class Split(Op):
    """One packed tensor -> `n` equal parts along axis 0 (nn.MultiheadAttention in_proj -> q, k, v);
    with `transpose`, each 2-D part becomes a kernel (in, out)."""

    n: int = 3
    transpose: bool = False
    name = "split"

    def shapes(self, src):
        s = tuple(src[0])
        if not s or s[0] % self.n:
            raise ValueError(f"expected axis 0 divisible by {self.n}, got shape {s}")
        if self.transpose and len(s) != 2:
            raise ValueError(f"expected a 2-D packed weight, got shape {s}")
        part = (s[0] // self.n,) + s[1:]
        return [part[::-1] if self.transpose else part] * self.n

    def inverse_shapes(self, dst):
        parts = [tuple(d)[::-1] if self.transpose else tuple(d) for d in dst]
        return [(sum(p[0] for p in parts),) + parts[0][1:]]

    def forward(self, xs):
        parts = np.split(xs[0], self.n, axis=0)
        return [p.T for p in parts] if self.transpose else parts

    def inverse(self, ys):
        return [np.concatenate([y.T if self.transpose else y for y in ys], axis=0)]


@dataclass(frozen=True)
class Stack(Op):
    """`n` row tensors (1, P) -> one (n, P) table (SAM2 `point_embeddings.{0..3}.weight`)."""

    n: int = 4
    name = "stack"

    def shapes(self, src):
        first = tuple(src[0])
        for s in src:
            if len(s) != 2 or s[0] != 1 or tuple(s) != first:
                raise ValueError(f"expected {self.n} tensors of shape (1, P), got {[tuple(x) for x in src]}")
        return [(self.n, first[1])]

    def inverse_shapes(self, dst):
        return [(1, dst[0][1])] * self.n

    def forward(self, xs):
        return [np.concatenate(xs, axis=0)]

    def inverse(self, ys):
        return [ys[0][i: i + 1] for i in range(self.n)]


@dataclass(frozen=True)
class LoRAMerge(Op):
    """(W (out, in), A (r, in), B (out, r)) -> kernel (in, out) = (W + s·B·A)ᵀ, computed in float32.

    The inverse gives back (kernelᵀ, zeros A, zeros B): the same function, written with an all-zero adapter of
    rank `rank` (used to export a merged model into a layout that stores LoRA weights)."""

    scaling: float = 2.0
    rank: int = 16
    name = "lora_merge"

    def shapes(self, src):
        w, a, b = (tuple(s) for s in src)
        if len(w) != 2 or len(a) != 2 or len(b) != 2 or a[1] != w[1] or b[0] != w[0] or a[0] != b[1]:
            raise ValueError(f"expected W (out, in), A (r, in), B (out, r), got {w}, {a}, {b}")
        return [w[::-1]]

    def inverse_shapes(self, dst):
        k = tuple(dst[0])
        return [k[::-1], (self.rank, k[0]), (k[1], self.rank)]

    def forward(self, xs):
        w, a, b = (x.astype(np.float32) for x in xs)
        return [(w + np.float32(self.scaling) * (b @ a)).T]

    def inverse(self, ys):
        k = ys[0]
        return [k.T, np.zeros((self.rank, k.shape[0]), k.dtype), np.zeros((k.shape[1], self.rank), k.dtype)]


@dataclass(frozen=True)
class LoRAFold(Op):
    """Export direction of a kept adapter into a plain weight: (kernel, lora_a, lora_b) -> W = (kernel + s·a·b)ᵀ.

    Source side is the single merged weight W (out, in); destination side is our three tensors. Only the
    inverse (ours -> PyTorch) exists."""

    scaling: float = 2.0
    name = "lora_fold"

    def shapes(self, src):
        raise NotInvertible("a merged weight cannot be split into a kernel and a LoRA adapter")

    def inverse_shapes(self, dst):
        return [tuple(dst[0])[::-1]]

    def forward(self, xs):
        raise NotInvertible("a merged weight cannot be split into a kernel and a LoRA adapter")

    def inverse(self, ys):
        k, a, b = (y.astype(np.float32) for y in ys)
        return [(k + np.float32(self.scaling) * (a @ b)).T]


@dataclass(frozen=True)
class Duplicate(Op):
    """The same tensor stored under `n` source keys (PEFT saves a targeted lm_head's base weight in the adapter
    as well as in the base model). Forward takes the last copy; inverse writes all `n` copies."""

    n: int = 2
    transpose: bool = False
    name = "duplicate"

    def shapes(self, src):
        s = tuple(src[-1])
        return [s[::-1] if self.transpose else s]

    def inverse_shapes(self, dst):
        s = tuple(dst[0])
        return [s[::-1] if self.transpose else s] * self.n

    def forward(self, xs):
        return [xs[-1].T if self.transpose else xs[-1]]

    def inverse(self, ys):
        return [ys[0].T if self.transpose else ys[0]] * self.n
