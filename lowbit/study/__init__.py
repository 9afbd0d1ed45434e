"""lowbit study: models x bit-widths, measured and reported (plan, run, report)."""
