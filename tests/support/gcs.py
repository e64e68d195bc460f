"""GCS emulator fixtures (fake-gcs-server + HTTPS CONNECT proxy): filled by the foundation issue."""
