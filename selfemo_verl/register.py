"""The `verl.plugins` entry point: `import verl` imports this module in every process (Ray workers too).

Importing each adapter module runs its verl registration decorator. verl swallows plugin import errors at
DEBUG level, so tests/test_register_on_cpu.py asserts every name below exists after a plain `import verl`.
"""

# Each import registers the names in its comment.
