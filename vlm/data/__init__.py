"""Report parsing, proving-ground (phantom) generators, manifests, datasets and transforms."""
