"""Small offline examples (scikit-learn's bundled digits) used by the demo, tests and docs."""
