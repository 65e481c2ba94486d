"""Shared test helpers: tiny and real models, independent references, local tasks, requests, engine shortcuts."""
