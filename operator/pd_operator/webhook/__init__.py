"""The admission webhook: review.py (pure decisions), server.py (HTTPS shell), configs.py (the
webhook configuration objects). The development CA for `--local-webhook` is pd_dev.certs."""
