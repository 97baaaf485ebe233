"""SELF-EMO on verl 0.9.1: self-play emotion recognition in conversation as a verl plugin.

Importing the package imports nothing from verl; `selfemo_verl.register` (the `verl.plugins` entry point)
does the registration.
"""

__version__ = "0.1.0"
