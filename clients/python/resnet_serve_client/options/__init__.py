"""Connection options: TLS, retries, keepalive and the channel they configure."""
