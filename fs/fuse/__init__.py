"""pyfuse3 adapter over fs.client: `ops.StripeOperations` and `mount.run_mount`."""
