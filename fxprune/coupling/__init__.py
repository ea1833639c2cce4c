"""Stage 3: channel coupling — units, op rules and tables, groups."""
