"""Wingbeat's scientific core: spectra, the dynamic β-VAE, latent clusters. Pure: no files, sockets or clocks."""
