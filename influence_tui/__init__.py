"""Influence TUI: privacy-first local LLM inference in the terminal."""

__version__ = "0.1.0"
