"""deepalign: measure, attack, deepen and protect how deep a language model's safety alignment goes."""

__version__ = "0.1.0"
