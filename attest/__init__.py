"""cdvm attestation: evidence providers, parsers, verification, policy and collateral."""
