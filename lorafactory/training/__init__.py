"""The generic training machinery: a LightningModule with no variant code, and the callback that calls the hooks."""
