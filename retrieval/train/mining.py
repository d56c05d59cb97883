"""Hard negatives mined by the frozen dual encoder.

What search puts beside the true item is what the dual encoder scores high:
:func:`mine` finds, per query, the highest-scoring candidates with another
key, and :class:`Alike` draws groups of four items the dual encoder finds
alike (each image against each caption in training, so every negative is one
search could have ranked first).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def mine(q: np.ndarray, c: np.ndarray, q_key: np.ndarray, c_key: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest-scoring candidates with a different key, per query."""
    k = min(k, len(c) - 1)
    out = np.zeros((len(q), max(k, 1)), np.int64)
    if k < 1:
        return out
    cv, ck = torch.from_numpy(c), torch.from_numpy(c_key)
    for start in range(0, len(q), 1024):
        s = torch.from_numpy(q[start : start + 1024]) @ cv.T
        s[torch.from_numpy(q_key[start : start + 1024])[:, None] == ck[None]] = -math.inf
        out[start : start + len(s)] = s.topk(k, dim=1).indices.numpy()
    return out


class Alike:
    """Per item (one caption, one image), the items with other keys the dual
    encoder ranks highest against it (caption to image and image to caption,
    ``k`` each), from which groups of alike items are drawn."""

    def __init__(self, img_vec: np.ndarray, txt_vec: np.ndarray, keys: np.ndarray, k: int = 12) -> None:
        self.img_vec, self.txt_vec = img_vec, txt_vec
        self.key = np.unique(keys, return_inverse=True)[1]
        self.near = np.concatenate([mine(txt_vec, img_vec, self.key, self.key, k),
                                    mine(img_vec, txt_vec, self.key, self.key, k)], 1)

    def groups(self, anchors: np.ndarray, rng: np.random.Generator, size: int = 4) -> np.ndarray:
        """Item indices of one group of ``size`` per anchor (anchor first), all keys distinct."""
        out = np.empty((len(anchors), size), np.int64)
        for row, a in enumerate(anchors):
            chosen, keys = [int(a)], {self.key[a]}
            for c in self.near[a, rng.permutation(self.near.shape[1])]:
                if self.key[c] not in keys:
                    chosen.append(int(c))
                    keys.add(self.key[c])
                    if len(chosen) == size:
                        break
            while len(chosen) < size:  # too few alike items: fill with random ones of other keys
                c = int(rng.integers(len(self.key)))
                if self.key[c] not in keys:
                    chosen.append(c)
                    keys.add(self.key[c])
            out[row] = chosen
        return out

    def dual_accuracy(self, groups: np.ndarray) -> dict[str, float]:
        """Within-group t2i and i2t accuracy of the dual encoder on ``groups``."""
        s = np.einsum("gid,gjd->gij", self.img_vec[groups], self.txt_vec[groups])  # [group, image, caption]
        target = np.arange(groups.shape[1])
        return {"t2i": float((s.argmax(1) == target).mean()), "i2t": float((s.argmax(2) == target).mean())}
