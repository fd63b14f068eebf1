"""kdx's Hydra configs, shipped in the wheel as the package kdx.conf (kdx/conf links here in a checkout)."""
