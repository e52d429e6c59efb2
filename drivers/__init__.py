"""Source drivers: each turns device traffic into readings."""
