"""Baselines MITS-GAN is compared with (TAFIM)."""
