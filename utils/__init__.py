"""Small pure helpers: scan I/O, cubes, equaliser, metrics, errors."""
