"""Training CT-GAN's injector and remover: networks, dataset builder, trainer, demo figure."""
