"""The CT-GAN attacker: the Keras pipeline, its PyTorch port, the torch black-box attacker."""
