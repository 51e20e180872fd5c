"""Multi-step pipelines: CT-GAN attack and training, data preparation, protection, evaluation."""
