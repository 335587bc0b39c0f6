"""Small reusable widgets, grouped by the region of the app they belong to."""
