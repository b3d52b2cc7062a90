"""One script per appendix figure, driven by ``make figures``."""
