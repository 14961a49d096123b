"""The conditionally Gaussian block: plain data shared by the analysis, the solver and the guide.

Given the hyperparameters theta (every latent site outside the block), the block z is jointly
Gaussian a priori and enters each likelihood it touches only through an affine natural parameter:

    log p(y, z, theta) = -1/2 z^T H(theta) z + b(theta)^T z + c(theta)   (``exact``: Normal likelihoods)

and for Bernoulli/Binomial logits or a Poisson log rate the conditional is approximated by
Laplace (``exact`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

#: How each supported likelihood family enters: the natural parameter that must be affine in z.
LIKELIHOOD_LINKS = {
    "Normal": "identity",
    "Bernoulli": "logit",
    "BernoulliLogits": "logit",
    "Binomial": "logit",
    "BinomialLogits": "logit",
    "Poisson": "log",
}


@dataclass(frozen=True)
class BlockSite:
    """One latent site of the block, with the shape of its value as traced."""

    name: str
    shape: tuple[int, ...]
    family: str

    @property
    def size(self) -> int:
        return prod(self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "family": self.family}

    @classmethod
    def from_json(cls, d: dict) -> "BlockSite":
        return cls(d["name"], tuple(int(n) for n in d["shape"]), d["family"])


@dataclass(frozen=True)
class BlockLikelihood:
    """An observed site whose natural parameter is affine in the block."""

    name: str
    family: str
    link: str

    @property
    def exact(self) -> bool:
        return self.link == "identity"

    def to_json(self) -> dict:
        return {"name": self.name, "family": self.family, "link": self.link}

    @classmethod
    def from_json(cls, d: dict) -> "BlockLikelihood":
        return cls(d["name"], d["family"], d["link"])


@dataclass(frozen=True)
class GaussianBlock:
    """The block z, the likelihoods it enters, theta, and why other latent sites were left out."""

    sites: tuple[BlockSite, ...]
    likelihoods: tuple[BlockLikelihood, ...]
    theta: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)  # latent site -> reason

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sites)

    @property
    def exact(self) -> bool:
        """True when every likelihood is Normal, so p(z | theta, y) is exactly Gaussian."""
        return all(lik.exact for lik in self.likelihoods)

    def to_json(self) -> dict:
        return {
            "sites": [s.to_json() for s in self.sites],
            "likelihoods": [lik.to_json() for lik in self.likelihoods],
            "theta": list(self.theta),
            "left_out": dict(self.left_out),
            "size": self.size,
            "exact": self.exact,
        }

    @classmethod
    def from_json(cls, d: dict) -> "GaussianBlock":
        return cls(
            tuple(BlockSite.from_json(s) for s in d["sites"]),
            tuple(BlockLikelihood.from_json(lik) for lik in d["likelihoods"]),
            tuple(d["theta"]),
            dict(d.get("left_out", {})),
        )
