"""The retrieval service and the `cmh` command line."""
