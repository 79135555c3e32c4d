"""Stand-in for Hugging Face transformers (tests only): the modules our plugin touches."""

__version__ = "0.0.0+stand-in"
