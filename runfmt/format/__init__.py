"""The pure core of the runfmt format: names, manifests, records, frames, checksums, keys.

Nothing in this package performs I/O, reads the clock or draws random numbers:
bytes, strings and dicts go in, values come out.
"""
