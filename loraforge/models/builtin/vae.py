"""The builtin models' VAE: a tiny AutoencoderKL structured as a nearly linear, approximately invertible
colour transform, so decoded brightness and colour follow the latents as in a trained VAE."""

from __future__ import annotations

import torch

from loraforge.models.builtin.seed import BUILTIN_SEED, seeded

# The VAE's GroupNorms use 8 groups: 4-8 channels per group, as real SD VAEs have (128-512 channels, 32
# groups). With one channel per group every per-channel mean (brightness, colour) would be normalised away.
_VAE_GROUPS = 8
# Latent channels are luminance, two colour differences (BT.601) and a luminance edge channel.
_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
# Residual branches (ResNet convs, attention outputs) start at this fraction of their random init, so each block
# is close to the identity plus a small random non-linearity (zero-/small-init residuals, as in Fixup).
_RESIDUAL_GAIN = 0.1
# Constant "carrier" channels that dominate each output GroupNorm's statistics, and the offset that keeps the signal in
# the nearly linear part of SiLU: together they make norm -> SiLU an almost affine map of the signal channels.
_CARRIER = 8.0
_SILU_OFFSET = 5.0



def tiny_vae(seed_offset: int):
    """A tiny AutoencoderKL whose encoder/decoder are an approximately inverse, nearly linear pair.

    The encoder maps 2x2 pixel blocks to (Y, Cb, Cr, edge) latents and the decoder maps them back (nearest
    upsampling), so decoded brightness and colour follow the latents as in a trained VAE; the residual blocks
    keep small random weights. `scaling_factor` is then measured as SD's was: 1 / std of the latents of a
    fixed set of images, so scaled latents have unit variance.
    """
    from diffusers import AutoencoderKL

    seeded(seed_offset)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_VAE_GROUPS,
        sample_size=64,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        _structure_vae(vae)
    vae.register_to_config(scaling_factor=_latent_scaling_factor(vae))
    return vae


def _signal_channels(channels: int) -> list[int]:
    """The channel carrying latent channel j is the first one of GroupNorm group j (one signal per group)."""
    per_group = max(channels // _VAE_GROUPS, 1)  # latents and images: channels 0-3 themselves
    return [j * per_group for j in range(4)]


def _set_carriers(bias: torch.Tensor) -> None:
    """Put +-carrier constants on the non-signal channels of a bias feeding an output GroupNorm: in each group
    of a signal channel the k-th other channel gets (-1)^k * carrier (the pattern `_linearise_norm` assumes)."""
    per_group = len(bias) // _VAE_GROUPS
    for c in range(len(bias)):
        k = c % per_group - 1  # the signal is the group's first channel
        bias[c] = 0.0 if k < 0 else (1.0 if k % 2 == 0 else -1.0) * _CARRIER


def _linearise_norm(norm: torch.nn.GroupNorm) -> None:
    """Affine of an output GroupNorm so a signal channel x leaves it as x + offset (given `_set_carriers`)."""
    n = norm.num_channels // norm.num_groups
    carriers = torch.tensor([(1.0 if k % 2 == 0 else -1.0) * _CARRIER for k in range(n - 1)])
    values = torch.cat([torch.zeros(1), carriers])
    mean, std = values.mean(), values.std(unbiased=False)
    # normalised signal = (x (1 - 1/n) - mean) / std; undo the gain and the shift, add the SiLU offset.
    for c in _signal_channels(norm.num_channels):
        norm.weight[c] = std / (1 - 1 / n)
        norm.bias[c] = _SILU_OFFSET + mean / (1 - 1 / n)


def _route(conv: torch.nn.Conv2d, taps: list[tuple[int, int]], weights: torch.Tensor) -> None:
    """Set conv to map input signal channels to output signal channels with `weights` [out j, in k], spread over
    the kernel `taps` (averaged), and nothing else on the main path."""
    conv.weight.zero_()
    conv.bias.zero_()
    outs, ins = _signal_channels(conv.out_channels), _signal_channels(conv.in_channels)
    for j, o in enumerate(outs[: weights.shape[0]]):
        for k, i in enumerate(ins[: weights.shape[1]]):
            for ty, tx in taps:
                conv.weight[o, i, ty, tx] = weights[j, k] / len(taps)


def _damp_residuals(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        if name.endswith("conv2") or name.endswith("to_out.0"):
            sub.weight.mul_(_RESIDUAL_GAIN)
            sub.bias.mul_(_RESIDUAL_GAIN)


def _structure_vae(vae) -> None:
    enc, dec = vae.encoder, vae.decoder
    _damp_residuals(vae)
    centre, eye = [(1, 1)], torch.eye(4)
    # encoder: RGB -> (Y, Cb, Cr) at the centre tap, and a horizontal luminance edge for the fourth channel.
    enc.conv_in.weight.zero_()
    enc.conv_in.bias.zero_()
    sig = _signal_channels(enc.conv_in.out_channels)
    for j in range(3):
        enc.conv_in.weight[sig[j], :, 1, 1] = _YCC[j]
    enc.conv_in.weight[sig[3], :, 1, 0] = -0.5 * _YCC[0]
    enc.conv_in.weight[sig[3], :, 1, 2] = 0.5 * _YCC[0]
    _route(enc.down_blocks[0].downsamplers[0].conv, [(0, 0), (0, 1), (1, 0), (1, 1)], eye)  # 2x2 mean, stride 2
    _route(enc.down_blocks[1].resnets[0].conv_shortcut, [(0, 0)], eye)
    _set_carriers(enc.mid_block.resnets[-1].conv2.bias)
    _linearise_norm(enc.conv_norm_out)
    _route(enc.conv_out, centre, eye)
    enc.conv_out.bias[:4] = -_SILU_OFFSET
    enc.conv_out.bias[4:] = -8.0  # log-variance: a nearly deterministic posterior, as trained VAEs have
    vae.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])
    vae.quant_conv.bias.zero_()
    # decoder: the inverse colour transform after nearest upsampling; the edge channel is not rendered.
    vae.post_quant_conv.weight.copy_(eye[:, :, None, None])
    vae.post_quant_conv.bias.zero_()
    _route(dec.conv_in, centre, eye)
    _route(dec.up_blocks[0].upsamplers[0].conv, centre, eye)
    _route(dec.up_blocks[1].resnets[0].conv_shortcut, [(0, 0)], eye)
    _set_carriers(dec.up_blocks[-1].resnets[-1].conv2.bias)
    _linearise_norm(dec.conv_norm_out)
    rgb = torch.linalg.inv(_YCC)
    _route(dec.conv_out, centre, torch.cat([rgb, torch.zeros(3, 1)], dim=1))
    dec.conv_out.bias.copy_(-_SILU_OFFSET * rgb.sum(dim=1))


def calibration_images(n: int = 16, size: int = 32) -> torch.Tensor:
    """Fixed smooth synthetic images in [-1, 1]: a random colour, a colour gradient and a little noise."""
    g = torch.Generator().manual_seed(BUILTIN_SEED)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        slope = torch.rand(2, 3, 1, 1, generator=g) - 0.5
        noise = 0.1 * torch.randn(3, size, size, generator=g)
        images.append((colour + slope[0] * xx + slope[1] * yy + noise).clamp(-1, 1))
    return torch.stack(images)


def _latent_scaling_factor(vae) -> float:
    """1 / std of the encoder's latents on the calibration images (how SD chose 0.18215), to 4 significant digits."""
    with torch.no_grad():
        latents = vae.encode(calibration_images()).latent_dist.mean
    return float(f"{1.0 / float(latents.std()):.4g}")
