"""Segmentation: phantoms, the GAN generator/discriminator, training, evaluation and inference."""
