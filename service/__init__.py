"""The retrieval service: the HTTP app, its routes, schemas and settings, and what serves a
request (the encoder, uploads, jobs)."""
