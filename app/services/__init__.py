"""Business rules. Each function takes a session and a caller/project, raises domain errors, never HTTP."""
