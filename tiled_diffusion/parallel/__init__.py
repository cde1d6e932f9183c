"""One canvas over several processes (torch.distributed), plugged into the model and the VAE from outside."""
