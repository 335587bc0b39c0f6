"""The full-screen Textual app. Nothing here imports torch at module level: the first frame must
paint before the engine (and torch) load in a worker thread."""
