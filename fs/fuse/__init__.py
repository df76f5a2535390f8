"""pyfuse3 adapter over stripefs.client: `ops.StripeOperations` and `mount.run_mount`."""
