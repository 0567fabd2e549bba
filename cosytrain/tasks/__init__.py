"""Lightning tasks: one LightningModule per stage, precision plugins, schedulers and callbacks."""
