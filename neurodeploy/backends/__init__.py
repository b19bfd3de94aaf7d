"""Hardware backends; each module is registered in :data:`neurodeploy.deploy.BACKENDS`."""
