"""The admission webhook: review.py (pure decisions), server.py (HTTPS shell), configs.py (the
webhook configuration objects), certs.py (a development CA via openssl)."""
