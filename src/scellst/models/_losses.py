"""Losses of the multiple-instance learner, selectable by name.

=============  ==========================================  ======================================================
name           fitted quantity                             when to use it
=============  ==========================================  ======================================================
``"mse"``      ``log1p`` of counts per 10,000, divided by   the paper's default; robust, fast, insensitive to
               a per-gene robust scale fitted per slide     library-size differences between slides
``"nb"``       raw counts, negative binomial with a         low-count genes and large gene panels, where
               learned per-gene dispersion; the spot        log-normalisation distorts zeros; the model is
               library size is the size factor              generative (cells add up to spot counts)
``"poisson"``  raw counts, Poisson                          as ``"nb"`` when counts show little over-dispersion
``"cosine"``   per-slide cosine between predicted and       MISO's choice: only the pattern across the spots of a
               measured (centred) expression of each gene   slide matters, not its level; one batch per slide
=============  ==========================================  ======================================================
"""

from __future__ import annotations

LOSSES = ("mse", "nb", "poisson", "cosine")
COUNT_LOSSES = ("nb", "poisson")


def mse(pred, target):
    """Mean squared error."""
    return ((pred - target) ** 2).mean()


def nb_nll(mu, counts, log_theta, *, parametrization: str = "mean"):
    """Mean negative log-likelihood of a negative binomial.

    ``parametrization="mean"`` uses the mean ``mu`` and inverse dispersion ``theta`` directly;
    ``"total_count"`` goes through :class:`torch.distributions.NegativeBinomial` (``total_count=theta``,
    ``logits = log mu - log theta``). Both describe the same distribution.
    """
    import torch

    theta = torch.exp(log_theta).clamp(min=1e-4, max=1e6)
    eps = 1e-8
    if parametrization == "total_count":
        dist = torch.distributions.NegativeBinomial(
            total_count=theta.expand_as(mu), logits=torch.log(mu + eps) - torch.log(theta)
        )
        return -dist.log_prob(counts).mean()
    log_theta_mu = torch.log(theta + mu + eps)
    ll = (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + counts * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
    )
    return -ll.mean()


def poisson_nll(mu, counts):
    """Mean Poisson negative log-likelihood."""
    import torch

    return (mu - counts * torch.log(mu + 1e-8) + torch.lgamma(counts + 1)).mean()


def cosine_per_slide(pred, target, slide_index):
    """``1 - cosine`` between centred predicted and measured expression of each gene over the spots of each slide."""
    import torch

    losses = []
    for s in torch.unique(slide_index):
        m = slide_index == s
        if int(m.sum()) < 2:
            continue
        p = pred[m] - pred[m].mean(dim=0)
        t = target[m] - target[m].mean(dim=0)
        cos = (p * t).sum(dim=0) / (p.norm(dim=0) * t.norm(dim=0) + 1e-8)
        losses.append(1 - cos.mean())
    if not losses:
        return ((pred - target) ** 2).mean() * 0
    return torch.stack(losses).mean()
