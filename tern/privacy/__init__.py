"""Differential privacy for tern's rounds (issue 12).

- `tern.privacy.terms`: what a round's schedule asks (`DpTerms`, `Noise`);
- `tern.privacy.noise`: the discrete Gaussian sampler (devices) and central noise
  (coordinator);
- `tern.privacy.clip`: a device's clipped, weighted update with the plain codecs
  (`dp_update`); under secure aggregation `tern.secagg.ring.encode_contribution` does
  the same in integers;
- `tern.privacy.ledger`: the coordinator's accountant (needs the `privacy` extra,
  dp-accounting), so it is not imported here: devices never load it.

`clip` is not imported here either: it needs `tern.messages`, which imports this package
through `tern.schedule`.
"""

from tern.privacy.noise import central_noise, discrete_gaussian
from tern.privacy.terms import DpTerms, Noise

__all__ = ["DpTerms", "Noise", "central_noise", "discrete_gaussian"]
