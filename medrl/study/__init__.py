"""The whole study as narrated, resumable stages (`make reproduce`)."""
