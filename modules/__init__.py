"""slimtrain.modules: the model and the plugins, single-device PyTorch (no distributed state)."""
