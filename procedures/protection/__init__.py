"""Protection: applying a generator, the disruption target, the white-box loss, targeted protection, bounds."""
