"""Stand-in for VideoTuna's image AutoencoderKL: 8x down/up-sampling, diagonal Gaussian posterior."""

from torch import nn

from videotuna.utils.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig=None, embed_dim=4, monitor=None, **kwargs):
        super().__init__()
        ch, z = ddconfig["ch"], ddconfig["z_channels"]
        self.encoder = nn.Sequential(nn.Conv2d(ddconfig["in_channels"], ch, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(ch, 2 * z, 8, stride=8))
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(z, ch, 8, stride=8), nn.SiLU(),
                                     nn.Conv2d(ch, ddconfig["out_ch"], 3, padding=1), nn.Tanh())

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z, **kwargs):
        return self.decoder(self.post_quant_conv(z))
