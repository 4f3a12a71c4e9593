"""Preprocessing of uint8 image batches, normalisation and augmentation, in torch only (no
torchvision)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from isgd.data import DataSplit

__all__ = ["Preprocess"]


class Preprocess:
    r"""Turn a uint8 ``N×C×H×W`` batch into a float32 network input, in torch ops only.

    Modes: ``scale`` :math:`x/256` (Caffe LeNet, ``scale: 0.00390625``); ``standardize``
    :math:`(x/255 - \mu_c)/\sigma_c`; ``mean_subtract`` :math:`x - \bar{x}_{chw}` in pixel units
    (Caffe CIFAR-10 quick's mean file). Training augmentation (``train=True``), applied to the
    uint8 pixels before normalising: a random crop after zero padding by ``crop_padding`` and a
    random horizontal flip, both vectorised over the batch and drawn from ``self.generator``.
    With ``crop_size`` every batch is cut to ``crop_size``² pixels (Caffe's ``crop_size``, 227 for
    AlexNet): at random positions in training batches when ``random_crop``, else the centre.

    Args:
        mode: ``scale``, ``standardize`` or ``mean_subtract``.
        mean, std: per-channel statistics in [0, 1] units (``standardize``).
        mean_image: ``C×H×W`` mean in pixel units (``mean_subtract``).
        crop_padding: pixels of zero padding for the random crop; 0 disables it.
        crop_size: side of the crop taken from every batch; 0 keeps the full image.
        random_crop: training batches get random crops (``crop_size``) instead of the centre.
        flip: random horizontal flip with probability 1/2.
        channels_last: return the batch in ``torch.channels_last`` memory format.
        seed: seed of the augmentation generator.

    Example:
        >>> pre = Preprocess.for_data(data, "standardize", crop_padding=4, flip=True, seed=0)
        >>> x = pre(data.x_train[idx], train=True)
    """

    MODES = ("scale", "standardize", "mean_subtract")

    def __init__(
        self,
        mode: str = "standardize",
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        mean_image: Tensor | None = None,
        crop_padding: int = 0,
        crop_size: int = 0,
        random_crop: bool = False,
        flip: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"Invalid preprocess mode: {mode!r} (known: {', '.join(self.MODES)})")
        if crop_padding < 0:
            raise ValueError(f"Invalid crop_padding value: {crop_padding}")
        if crop_size < 0:
            raise ValueError(f"Invalid crop_size value: {crop_size}")
        self.mode, self.crop_padding, self.flip = mode, int(crop_padding), bool(flip)
        self.crop_size, self.random_crop = int(crop_size), bool(random_crop)
        self.channels_last = bool(channels_last)
        self.generator = torch.Generator().manual_seed(seed)
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None
        if mode == "standardize":
            if mean is None or std is None or len(mean) != len(std):
                raise ValueError("standardize needs per-channel mean and std of equal length")
            if min(std) <= 0:
                raise ValueError(f"Invalid std value: {std}")
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            self._scale = 1.0 / (255.0 * s)
            self._shift = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / s
        elif mode == "mean_subtract":
            if mean_image is None or mean_image.dim() != 3:
                raise ValueError("mean_subtract needs a C×H×W mean_image")
            self._shift = -mean_image.float().unsqueeze(0)

    @classmethod
    def for_data(cls, data: DataSplit, mode: str = "standardize", **kwargs: Any) -> Preprocess:
        """A :class:`Preprocess` using ``data``'s statistics (keyword arguments as ``__init__``).

        With a ``crop_size``, ``mean_subtract`` subtracts the per-channel mean pixel (Caffe's
        ``mean_value``): a per-pixel mean image does not line up with random crops."""
        image = data.mean_image() if mode == "mean_subtract" else None
        if image is not None and kwargs.get("crop_size"):
            image = image.mean((1, 2), keepdim=True)
        return cls(mode, mean=data.mean, std=data.std, mean_image=image, **kwargs)

    def augment(self, x: Tensor, within: tuple[int, slice] | None = None) -> Tensor:
        """Random crop (after zero padding) and horizontal flip of a uint8 batch.

        ``within=(B, rows)``: ``x`` holds the rows ``rows`` of a batch of ``B`` (one rank's share
        of a global batch); the random numbers are drawn for all ``B`` and the rows' ones used,
        so every sample is augmented as in a single process, whatever the split.
        """
        total, rows = within if within is not None else (len(x), slice(None))
        if self.crop_size and self.random_crop:
            c = self._check_crop(x)
            x = self._random_windows(x, (c, c), total, rows)
        elif self.crop_size:
            x = self.centre_crop(x)
        if self.crop_padding:
            p = self.crop_padding
            x = self._random_windows(F.pad(x, (p, p, p, p)), x.shape[2:], total, rows)
        if self.flip:
            mask = (torch.rand(total, generator=self.generator)[rows] < 0.5).to(x.device)
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def _random_windows(self, x: Tensor, size, total: int, rows: slice) -> Tensor:
        """An ``h×w = size`` window of every image at a random offset, the same range for both
        axes (drawn for all ``total`` rows of the global batch, the ``rows`` ones used). Every
        window of the batch is a view, N × (H−h+1) × (W−w+1) × C × h × w; one indexing op then
        copies each image's own (2-4× faster than a gather)."""
        (h, w), n = size, len(x)
        off = torch.randint(0, x.shape[2] - h + 1, (2, total), generator=self.generator)
        off = off[:, rows].to(x.device)
        windows = x.unfold(2, h, 1).unfold(3, w, 1)
        return windows.permute(0, 2, 3, 1, 4, 5)[torch.arange(n, device=x.device), off[0], off[1]]

    def centre_crop(self, x: Tensor) -> Tensor:
        """The central ``crop_size``² pixels of every image (the full image without a crop)."""
        if not self.crop_size:
            return x
        c = self._check_crop(x)
        top, left = (x.shape[2] - c) // 2, (x.shape[3] - c) // 2
        return x[:, :, top : top + c, left : left + c]

    def _check_crop(self, x: Tensor) -> int:
        if self.crop_size > min(x.shape[2:]):
            raise ValueError(
                f"crop_size {self.crop_size} is larger than the images ({x.shape[2]}×{x.shape[3]})"
            )
        return self.crop_size

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 → float32 in the configured mode."""
        out = x.to(torch.float32)
        if self.mode == "scale":
            return self._layout(out.mul_(0.00390625))
        if self._shift is not None and self._shift.device != x.device:  # moved once, then kept
            self._shift = self._shift.to(x.device)
            self._scale = None if self._scale is None else self._scale.to(x.device)
        if self._scale is not None:
            out.mul_(self._scale)
        return self._layout(out if self._shift is None else out.add_(self._shift))

    def _layout(self, out: Tensor) -> Tensor:
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __call__(
        self, x: Tensor, *, train: bool = False, within: tuple[int, slice] | None = None
    ) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected a uint8 N×C×H×W batch, got {x.dtype} {tuple(x.shape)}")
        if self._shift is not None and self._shift.shape[1] != x.shape[1]:
            raise ValueError(
                f"{self.mode} statistics have {self._shift.shape[1]} channels, "
                f"the batch has {x.shape[1]}"
            )
        return self.normalize(self.augment(x, within) if train else self.centre_crop(x))

    def state_dict(self) -> dict[str, Tensor]:
        """The augmentation generator's state, for exact resumption."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
