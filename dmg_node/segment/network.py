"""The segmentation GAN: a small 3D attention U-Net generator and a patch discriminator.

After the design of Deng et al. (Front. Oncol. 2025, 15:1602516; only the abstract is public):
a generator that segments the tumour, with spatial-and-channel attention in its blocks and
multi-scale feature extraction, trained against a discriminator that judges (image, mask) pairs.
The sizes here are ours, chosen so that one volume runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks.aspp import SimpleASPP
from monai.networks.blocks.convolutions import Convolution
from monai.networks.blocks.squeeze_and_excitation import ChannelSELayer
from monai.networks.blocks.upsample import UpSample
from monai.networks.nets.patchgan_discriminator import PatchDiscriminator
from torch import nn

_ACT = ("LEAKYRELU", {"negative_slope": 0.01, "inplace": True})
_NORM = "INSTANCE"


@dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of :class:`Generator` (stored in the model manifest).

    Attributes
    ----------
    channels
        Feature channels per resolution level, full resolution first; each further level halves
        the grid, so inputs must be a multiple of ``2 ** (len(channels) - 1)`` along each axis.
    aspp_dilations
        Dilation of each parallel 3x3x3 branch of the bottleneck's multi-scale block (a 1x1x1
        branch is always added).
    se_reduction
        Reduction ratio of the channel squeeze-and-excitation.
    """

    channels: tuple[int, ...] = (8, 16, 32, 64, 96)
    aspp_dilations: tuple[int, ...] = (1, 2, 3)
    se_reduction: int = 2

    @property
    def divisor(self) -> int:
        """Each spatial input size must be a multiple of this."""
        return int(2 ** (len(self.channels) - 1))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> GeneratorConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            channels=tuple(int(c) for c in data["channels"]),  # type: ignore[attr-defined]
            aspp_dilations=tuple(int(d) for d in data["aspp_dilations"]),  # type: ignore[attr-defined]
            se_reduction=int(data["se_reduction"]),  # type: ignore[call-overload]
        )


class SpatialChannelSE(nn.Module):
    """Concurrent spatial and channel squeeze-and-excitation (scSE; Roy et al., MICCAI 2018).

    The channel branch (cSE) reweights feature maps from a global descriptor; the spatial branch
    (sSE) reweights voxels from a 1x1x1 projection of all channels. The two recalibrations add.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.channel = ChannelSELayer(spatial_dims=3, in_channels=channels, r=reduction)
        self.spatial = Convolution(
            spatial_dims=3, in_channels=channels, out_channels=1, kernel_size=1, act="SIGMOID", norm=None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recalibrate ``x`` (N, C, D, H, W); the output has the same shape."""
        cse: torch.Tensor = self.channel(x)
        sse: torch.Tensor = self.spatial(x)
        return cse + x * sse


class AttentionBlock(nn.Sequential):
    """Two conv-norm-activation layers (the first may stride) followed by scSE attention."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, reduction: int = 2) -> None:
        super().__init__(
            Convolution(3, in_channels, out_channels, strides=stride, kernel_size=3, act=_ACT, norm=_NORM),
            Convolution(3, out_channels, out_channels, kernel_size=3, act=_ACT, norm=_NORM),
            SpatialChannelSE(out_channels, reduction),
        )


class Generator(nn.Module):
    """3D U-Net with scSE attention blocks and a dilated multi-scale (ASPP) bottleneck.

    Input: (N, 1, D, H, W) z-scored image, each spatial size a multiple of
    ``config.divisor``. Output: (N, 1, D, H, W) tumour logits (sigmoid gives probability).
    """

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = config or GeneratorConfig()
        ch = self.config.channels
        r = self.config.se_reduction
        self.encoders = nn.ModuleList(
            [AttentionBlock(1, ch[0], reduction=r)]
            + [AttentionBlock(ch[i - 1], ch[i], stride=2, reduction=r) for i in range(1, len(ch))]
        )
        n_branches = 1 + len(self.config.aspp_dilations)
        branch = max(ch[-1] // n_branches, 1)
        self.bottleneck = nn.Sequential(
            SimpleASPP(
                spatial_dims=3,
                in_channels=ch[-1],
                conv_out_channels=branch,
                kernel_sizes=(1,) + (3,) * len(self.config.aspp_dilations),
                dilations=(1,) + self.config.aspp_dilations,
                norm_type=_NORM,
                acti_type=_ACT,
            ),
            Convolution(3, branch * n_branches, ch[-1], kernel_size=1, act=_ACT, norm=_NORM),
        )
        self.upsamples = nn.ModuleList(
            [
                UpSample(3, ch[i], ch[i - 1], scale_factor=2, mode="deconv", kernel_size=2)
                for i in range(len(ch) - 1, 0, -1)
            ]
        )
        self.decoders = nn.ModuleList(
            [AttentionBlock(2 * ch[i - 1], ch[i - 1], reduction=r) for i in range(len(ch) - 1, 0, -1)]
        )
        self.head = Convolution(3, ch[0], 1, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tumour logits for ``x`` (see the class docstring for shapes)."""
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the deepest level feeds the bottleneck, not a skip connection
        x = x + self.bottleneck(x)
        for upsample, decoder in zip(self.upsamples, self.decoders):
            x = decoder(torch.cat([upsample(x), skips.pop()], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits


class Discriminator(nn.Module):
    """3D patch discriminator (Pix2PixHD style, MONAI's ``PatchDiscriminator``) for training only.

    It judges an (image, mask) pair concatenated on the channel axis and returns a map of
    per-patch realness logits, so the generator is pushed towards masks whose local shape
    matches expert masks for that image.
    """

    def __init__(self, channels: int = 8, num_layers: int = 3) -> None:
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=3,
            channels=channels,
            in_channels=2,
            out_channels=1,
            num_layers_d=num_layers,
            norm="INSTANCE",
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch logits for (N, 1, D, H, W) image and mask (probabilities or 0/1 labels)."""
        features: list[torch.Tensor] = self.net(torch.cat([image, mask], dim=1))
        return features[-1]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
