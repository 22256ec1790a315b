"""Model definitions shared by the training scripts and export.py."""
import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_LATENT = 16
GAN_LATENT = 64

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,  # one head per attention block (head dim = channels)
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_small",
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)


class Classifier(nn.Module):
    """2 conv + 2 fc. `features` = the 128-d penultimate activations (after ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        feats = F.relu(self.fc1(h.flatten(1)))
        logits = self.fc2(self.drop(feats))
        return logits, feats


class VAEEncoder(nn.Module):
    def __init__(self, d=VAE_LATENT):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.LeakyReLU(0.2),      # 16x16
            nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),     # 8x8
            nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),    # 4x4
            nn.Flatten(), nn.Linear(128 * 16, 256), nn.LeakyReLU(0.2))
        self.mu = nn.Linear(256, d)
        self.logvar = nn.Linear(256, d)

    def forward(self, x):
        h = self.net(x)
        return self.mu(h), self.logvar(h)


def _up():
    return nn.Upsample(scale_factor=2, mode="nearest")


class VAEDecoder(nn.Module):
    """z [N,D] -> image [N,1,32,32] in [-1,1]. Nearest upsample + 3x3 conv (ConvTranspose
    backward is very slow on this CPU build of torch)."""

    def __init__(self, d=VAE_LATENT):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, 256), nn.LeakyReLU(0.2),
                                nn.Linear(256, 128 * 16), nn.LeakyReLU(0.2))
        self.net = nn.Sequential(
            _up(), nn.Conv2d(128, 64, 3, padding=1), nn.LeakyReLU(0.2),   # 8x8
            _up(), nn.Conv2d(64, 32, 3, padding=1), nn.LeakyReLU(0.2),    # 16x16
            _up(), nn.Conv2d(32, 32, 3, padding=1), nn.LeakyReLU(0.2),    # 32x32
            nn.Conv2d(32, 1, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(-1, 128, 4, 4))


class Generator(nn.Module):
    """DCGAN-style generator (BatchNorm, ReLU; nearest upsample + 3x3 conv):
    z [N,64] -> image [N,1,32,32] in [-1,1]."""

    def __init__(self, d=GAN_LATENT, ch=32):
        super().__init__()
        self.ch = ch
        self.fc = nn.Sequential(nn.Linear(d, ch * 4 * 16), nn.BatchNorm1d(ch * 4 * 16), nn.ReLU())
        self.net = nn.Sequential(
            _up(), nn.Conv2d(ch * 4, ch * 2, 3, padding=1), nn.BatchNorm2d(ch * 2), nn.ReLU(),  # 8
            _up(), nn.Conv2d(ch * 2, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),          # 16
            _up(), nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(),              # 32
            nn.Conv2d(ch, 1, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(-1, self.ch * 4, 4, 4))


class Discriminator(nn.Module):
    """Spectral-norm DCGAN discriminator (hinge loss)."""

    def __init__(self, ch=32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(1, ch, 4, 2, 1)), nn.LeakyReLU(0.2),           # 16
            sn(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2),      # 8
            sn(nn.Conv2d(ch * 2, ch * 4, 4, 2, 1)), nn.LeakyReLU(0.2),  # 4
            nn.Flatten(), sn(nn.Linear(ch * 4 * 16, 1)))

    def forward(self, x):
        return self.net(x).view(-1)


def make_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(**UNET_CONFIG)


class UNetWrapper(nn.Module):
    """(sample [N,1,32,32], timestep [N] int64) -> noise_pred [N,1,32,32]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep).sample
