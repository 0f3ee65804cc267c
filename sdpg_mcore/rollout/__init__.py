"""Rollouts: SGLang HTTP client, server/router launcher, weight sync, and the built-in CPU dev server."""
