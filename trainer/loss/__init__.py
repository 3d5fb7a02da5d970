"""The loss the backend backpropagates: language-modelling cross-entropy (whole or in chunks) through the plugins."""
